// What ptfast's CUDA kernels and their CPU emulation share.
//
// Most machines this project is built and tested on have no GPU, so every
// CUDA kernel is a thin __global__ shell around host+device *bodies* in a
// header next to it (csrc/ops/cuda/*_bodies.h): functions of integers and
// pointers that compute one element, or one thread's share of a reduction,
// given the thread's place in the launch. The shell only turns
// blockIdx/threadIdx into a ThreadIndex and places the __syncthreads()
// between the phases; the host code that picks a kernel and its launch shape
// is a plain function in the same header.
//
// csrc/ops/cpu/cuda_emulation/ runs the very same bodies on the CPU, over
// launches emulated thread by thread and phase by phase (emulate_launch,
// emulate_xor_shuffle), behind private CPU operators (`_cuda_emulated_*`)
// that the test suite compares with native torch on every CI run. What stays
// GPU-only is the launch itself and the shuffle and barrier instructions.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ptfast::cuda {

// A thread's place in a one-dimensional launch, as a body sees it.
struct ThreadIndex {
  int64_t block;   // blockIdx.x
  int64_t blocks;  // gridDim.x
  int thread;      // threadIdx.x
  int threads;     // blockDim.x

  C10_HOST_DEVICE int64_t global() const { return block * threads + thread; }
  C10_HOST_DEVICE int64_t grid_threads() const { return blocks * threads; }
};

#if defined(__CUDACC__)
__device__ inline ThreadIndex this_thread() {
  return {
      static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x),
      static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
}
#endif

// Blocks of a grid-stride launch over `items` work items, `per_block` per
// block: enough to cover them, capped where more blocks only add scheduling
// (each thread then loops), and at least one.
inline int64_t blocks_for(int64_t items, int64_t per_block) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return std::max<int64_t>(
      1, std::min<int64_t>((items + per_block - 1) / per_block, kMaxBlocks));
}

// Host-only emulation of a launch: fn(ThreadIndex) for every thread of every
// block, block after block. A kernel with barriers is emulated by calling
// emulate_block_phase once per phase of each block instead, so every thread
// finishes a phase before any starts the next.
template <typename Fn>
void emulate_launch(int64_t blocks, int threads, const Fn& fn) {
  for (int64_t block = 0; block < blocks; ++block) {
    for (int thread = 0; thread < threads; ++thread) {
      fn(ThreadIndex{block, blocks, thread, threads});
    }
  }
}

// Host-only emulation of one phase (the code between two barriers) of block
// `block` of a `blocks`-block launch: fn(ThreadIndex) for each of its threads.
template <typename Fn>
void emulate_block_phase(
    int64_t block, int64_t blocks, int threads, const Fn& fn) {
  for (int thread = 0; thread < threads; ++thread) {
    fn(ThreadIndex{block, blocks, thread, threads});
  }
}

// Host-only emulation of the butterfly `for offset = width / 2 .. 1:
// v = combine(v, __shfl_xor_sync(mask, v, offset, width))` over the lanes of
// one warp: every lane ends with the combination the GPU computes, in the
// same order, so reductions match the device's to the bit.
template <typename T, typename Combine>
void emulate_xor_shuffle(std::vector<T>& lanes, int width, const Combine& combine) {
  // lane ^ offset stays inside the lane's width-aligned group of lanes, as
  // on the GPU, because width is a power of two and offset < width.
  std::vector<T> before(lanes.size());
  for (int offset = width / 2; offset > 0; offset /= 2) {
    before = lanes;
    for (size_t lane = 0; lane < lanes.size(); ++lane) {
      lanes[lane] = combine(before[lane], before[lane ^ static_cast<size_t>(offset)]);
    }
  }
}

}  // namespace ptfast::cuda
