// CUDA kernels of the fused conv2d -> ReLU -> max_pool2d operator: shells
// that launch the bodies of conv2d_relu_max_pool2d_bodies.h over
// grid-stride loops, for the host code of conv2d_relu_max_pool2d_host.h.
// Everything but the launches is shared with the CPU emulation, which the
// test suite runs on every machine (launch.h).
//
// No kernel uses atomics: every result is written by the one thread that
// owns it, so repeated runs are bitwise identical (cuDNN's
// convolution_backward follows torch.backends.cudnn.deterministic, as in
// native eager).
#include "ops/cuda/conv2d_relu_max_pool2d_host.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ptfast::cuda {
namespace {

namespace cb = conv_block;

constexpr int kThreads = 256;

// The grid-stride kernel of the one-item-per-thread bodies (epilogue,
// conv_gradient, direct_forward), picked by the arguments' type.
template <typename Args, typename index_t>
__global__ void __launch_bounds__(kThreads)
    items_kernel(const Args args, index_t items) {
  cb::for_each_item(this_thread(), items, [&](index_t item) {
    cb::compute_item(args, item);
  });
}

// One block per tile (TiledLaunchShape); the three phases of the bodies,
// with a barrier after each staging and after each accumulation (the next
// channel's staging overwrites what the accumulation reads).
template <typename scalar_t, int PKH, int PKW, int KH, int KW>
__global__ void __launch_bounds__(cb::kTiledMaxThreads)
    direct_forward_tiled_kernel(
        const cb::TiledForwardArgs<scalar_t, int32_t> args) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared[];
  acc_t* tile_input = reinterpret_cast<acc_t*>(shared);
  acc_t* tile_weight = tile_input + args.input_rows * args.input_cols;
  const ThreadIndex thread = this_thread();
  const cb::Tile<int32_t> tile = cb::tile_of_block(args, thread.block);
  cb::TiledSums<acc_t, PKH, PKW> sums;
  cb::start_tile(args, tile, sums);
  for (int32_t c = 0; c < args.d.in_group; ++c) {
    cb::stage_input_channel(args, tile, c, thread, tile_input, tile_weight);
    __syncthreads();
    cb::accumulate_input_channel<KH, KW>(
        args, tile, thread, tile_input, tile_weight, sums);
    __syncthreads();
  }
  cb::finish_tile(args, tile, thread, sums);
}

// The GPU Launch of conv2d_relu_max_pool2d_host.h: the call's device and
// its current stream, set only after the argument checks, so a tensor on
// the wrong device gets the error that names it.
class GpuLaunch {
 public:
  explicit GpuLaunch(const at::Tensor& input)
      : guard_(input.device()), stream_(c10::cuda::getCurrentCUDAStream()) {}

  template <typename Args, typename index_t>
  void items(const Args& args, index_t items) const {
    items_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream_>>>(
        args, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, int PKH, int PKW, int KH, int KW>
  void direct_forward_tiled(
      const cb::TiledForwardArgs<scalar_t, int32_t>& args,
      const cb::TiledLaunchShape& shape) const {
    direct_forward_tiled_kernel<scalar_t, PKH, PKW, KH, KW>
        <<<shape.blocks, shape.threads, shape.shared_bytes, stream_>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  c10::cuda::CUDAStream stream_;
};

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CUDA, m) {
  m.impl(
      "conv2d_relu_max_pool2d",
      &ops::ForwardKernels<&cb::forward<GpuLaunch>>::without_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&cb::forward<GpuLaunch>>::with_codes);
  m.impl("_conv2d_relu_max_pool2d_backward", &cb::backward<GpuLaunch>);
}

}  // namespace ptfast::cuda
