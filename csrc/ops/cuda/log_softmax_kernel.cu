// CUDA kernels of log_softmax and its backward: thin shells around the
// bodies in log_softmax_bodies.h (which describes the five kernels and the
// rule choosing among them), with at::opmath_type accumulation (float for
// half types) and 32-bit in-row indexing where the tensor allows.
//
// The forward spends one exp per element on its (max, sum), computed online;
// the block_row_shared kernels read the input (backward: grad_output) from
// global memory once, keeping the row in shared memory for the write.
#include "ops/cuda/log_softmax_bodies.h"
#include "ops/log_softmax.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ptfast::cuda {
namespace {

using namespace log_softmax;

constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ acc_t shuffle_xor(acc_t v, int offset, int width) {
  return __shfl_xor_sync(kFullMask, v, offset, width);
}

template <typename acc_t>
__device__ MaxSum<acc_t> shuffle_xor(MaxSum<acc_t> v, int offset, int width) {
  return {shuffle_xor(v.max, offset, width), shuffle_xor(v.sum, offset, width)};
}

// The butterfly emulate_xor_shuffle reproduces; every lane of the warp takes
// part (kFullMask), whatever its row.
template <typename T, typename Combine>
__device__ T butterfly(T value, int width, const Combine& combine) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value = combine(value, shuffle_xor(value, offset, width));
  }
  return value;
}

// The block's combination of every thread's value. `partials` is reused by
// the caller's next row only after its closing __syncthreads().
template <typename T, typename Combine>
__device__ T
block_reduce(T value, T* partials, ThreadIndex t, const Combine& combine) {
  value = butterfly(value, kWarp, combine);
  if (t.thread % kWarp == 0) {
    partials[t.thread / kWarp] = value;
  }
  __syncthreads();
  return fold_partials(partials, t.threads / kWarp, combine);
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarpRowThreads) forward_warp_rows_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    int64_t rows, index_t length, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadIndex t = this_thread();
  const int lane = t.thread % lanes;
  for (int64_t first = warp_rows_first(t, lanes); first < rows;
       first += warp_rows_stride(t, lanes)) {
    const int64_t row = first + t.thread / lanes;
    const bool valid = row < rows;
    const scalar_t* x = input + (valid ? row : 0) * length;
    MaxSum<acc_t> s = valid
                          ? share_max_sum<false, false>(x, length, lane, lanes)
                          : empty_max_sum<acc_t>();
    s = butterfly(s, lanes, MergeMaxSum{});
    if (valid) {
      write_share<false>(
          x, output + row * length, length, lane, lanes,
          ForwardOutput<acc_t>(s));
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarpRowThreads) backward_warp_rows_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    int64_t rows, index_t length, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadIndex t = this_thread();
  const int lane = t.thread % lanes;
  for (int64_t first = warp_rows_first(t, lanes); first < rows;
       first += warp_rows_stride(t, lanes)) {
    const int64_t row = first + t.thread / lanes;
    const bool valid = row < rows;
    const int64_t offset = (valid ? row : 0) * length;
    acc_t sum = valid ? share_sum<false, false>(
                            grad_output + offset, length, lane, lanes)
                      : acc_t(0);
    sum = butterfly(sum, lanes, Add{});
    if (valid) {
      write_share<false>(
          grad_output + offset, output + offset, grad_input + offset, length,
          lane, lanes, BackwardGradInput<acc_t>{sum});
    }
  }
}

// The row copy of the block_row_shared kernels (16-byte aligned for packs).
template <typename scalar_t>
__device__ scalar_t* dynamic_row_copy() {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  return reinterpret_cast<scalar_t*>(dynamic_shared);
}

template <typename scalar_t, typename index_t, bool kVector, bool kShared>
__global__ void __launch_bounds__(kMaxThreads) forward_block_row_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    int64_t rows, index_t length) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ MaxSum<acc_t> partials[kMaxThreads / kWarp];
  scalar_t* copy = kShared ? dynamic_row_copy<scalar_t>() : nullptr;
  const ThreadIndex t = this_thread();
  for (int64_t row = t.block; row < rows; row += t.blocks) {
    const scalar_t* x = input + row * length;
    const MaxSum<acc_t> s = block_reduce(
        share_max_sum<kVector, kShared>(x, length, t.thread, t.threads, copy),
        partials, t, MergeMaxSum{});
    // Each thread writes the elements it copied itself (the same share), so
    // the copy needs no barrier of its own.
    write_share<kVector>(
        kShared ? copy : x, output + row * length, length, t.thread, t.threads,
        ForwardOutput<acc_t>(s));
    __syncthreads();  // partials are overwritten by the next row
  }
}

template <typename scalar_t, typename index_t, bool kVector, bool kShared>
__global__ void __launch_bounds__(kMaxThreads) backward_block_row_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    int64_t rows, index_t length) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partials[kMaxThreads / kWarp];
  scalar_t* copy = kShared ? dynamic_row_copy<scalar_t>() : nullptr;
  const ThreadIndex t = this_thread();
  for (int64_t row = t.block; row < rows; row += t.blocks) {
    const int64_t offset = row * length;
    const acc_t sum = block_reduce(
        share_sum<kVector, kShared>(
            grad_output + offset, length, t.thread, t.threads, copy),
        partials, t, Add{});
    write_share<kVector>(
        kShared ? copy : grad_output + offset, output + offset,
        grad_input + offset, length, t.thread, t.threads,
        BackwardGradInput<acc_t>{sum});
    __syncthreads();  // partials are overwritten by the next row
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kColumnThreads) forward_columns_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    ops::LogSoftmaxLayout l) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadIndex t = this_thread();
  const index_t dim_size = l.dim_size, inner = l.inner;
  for (int64_t column = t.global(); column < l.outer * l.inner;
       column += t.grid_threads()) {
    const int64_t start = column_start(l, column);
    const MaxSum<acc_t> s =
        column_max_sum(input + start, dim_size, inner, index_t(0), index_t(1));
    write_column(
        input + start, output + start, dim_size, inner, index_t(0), index_t(1),
        ForwardOutput<acc_t>(s));
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kColumnThreads) backward_columns_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    ops::LogSoftmaxLayout l) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadIndex t = this_thread();
  const index_t dim_size = l.dim_size, inner = l.inner;
  for (int64_t column = t.global(); column < l.outer * l.inner;
       column += t.grid_threads()) {
    const int64_t start = column_start(l, column);
    const acc_t sum = column_sum(
        grad_output + start, dim_size, inner, index_t(0), index_t(1));
    write_column(
        grad_output + start, output + start, grad_input + start, dim_size,
        inner, index_t(0), index_t(1), BackwardGradInput<acc_t>{sum});
  }
}

// The tree over a tile's slices (combine_slices_step), a barrier after each
// step; returns the thread's column's total, read from slice 0.
template <typename T, typename Combine>
__device__ T combine_slices(
    T value, T* shared, int thread, int block_columns, int dim_slices,
    const Combine& combine) {
  shared[thread] = value;
  __syncthreads();
  for (int half = dim_slices / 2; half > 0; half /= 2) {
    combine_slices_step(shared, thread, block_columns, half, combine);
    __syncthreads();
  }
  return shared[thread % block_columns];
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads) forward_columns_split_dim_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    ops::LogSoftmaxLayout l, int block_columns, int dim_slices) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ MaxSum<acc_t> slices[kMaxThreads];
  const ThreadIndex t = this_thread();
  const index_t dim_size = l.dim_size, inner = l.inner;
  const int64_t tiles = split_tiles(l, block_columns);
  for (int64_t tile = t.block; tile < tiles; tile += t.blocks) {
    const SplitColumn c = split_column(l, block_columns, tile, t.thread);
    const MaxSum<acc_t> mine = c.valid
                                   ? column_max_sum(
                                         input + c.start, dim_size, inner,
                                         index_t(c.slice), index_t(dim_slices))
                                   : empty_max_sum<acc_t>();
    const MaxSum<acc_t> s = combine_slices(
        mine, slices, t.thread, block_columns, dim_slices, MergeMaxSum{});
    if (c.valid) {
      write_column(
          input + c.start, output + c.start, dim_size, inner, index_t(c.slice),
          index_t(dim_slices), ForwardOutput<acc_t>(s));
    }
    __syncthreads();  // slices are overwritten by the next tile
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_columns_split_dim_kernel(
        const scalar_t* __restrict__ grad_output,
        const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
        ops::LogSoftmaxLayout l, int block_columns, int dim_slices) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t slices[kMaxThreads];
  const ThreadIndex t = this_thread();
  const index_t dim_size = l.dim_size, inner = l.inner;
  const int64_t tiles = split_tiles(l, block_columns);
  for (int64_t tile = t.block; tile < tiles; tile += t.blocks) {
    const SplitColumn c = split_column(l, block_columns, tile, t.thread);
    const acc_t mine = c.valid ? column_sum(
                                     grad_output + c.start, dim_size, inner,
                                     index_t(c.slice), index_t(dim_slices))
                               : acc_t(0);
    const acc_t sum = combine_slices(
        mine, slices, t.thread, block_columns, dim_slices, Add{});
    if (c.valid) {
      write_column(
          grad_output + c.start, output + c.start, grad_input + c.start,
          dim_size, inner, index_t(c.slice), index_t(dim_slices),
          BackwardGradInput<acc_t>{sum});
    }
    __syncthreads();  // slices are overwritten by the next tile
  }
}

// What plan_launch needs to know of `device`.
Device device_limits(c10::DeviceIndex device) {
  int multiprocessors = 0, max_shared_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &multiprocessors, cudaDevAttrMultiProcessorCount,
      static_cast<int>(device)));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin,
      static_cast<int>(device)));
  return {multiprocessors, max_shared_bytes};
}

// Launches a block_row kernel, opting in to more than the default 48 KB of
// dynamic shared memory when its row copy needs it.
template <typename KernelFn, typename... Args>
void launch_block_row(
    KernelFn kernel, const LaunchPlan& plan, cudaStream_t stream,
    Args... args) {
  if (plan.shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(plan.shared_bytes)));
  }
  kernel<<<plan.blocks, plan.threads, plan.shared_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor log_softmax_cuda(const at::Tensor& self, int64_t dim) {
  const auto t = ops::prepare_log_softmax(self, dim);
  const ops::LogSoftmaxLayout& l = t.layout;
  const c10::cuda::CUDAGuard device_guard(t.input.device());
  const LaunchPlan plan = plan_launch(
      l, t.input.element_size(), device_limits(t.input.device().index()));
  if (plan.kernel == Kernel::kNone) {
    return t.output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(), "log_softmax_cuda", [&] {
        const scalar_t* x = t.input.const_data_ptr<scalar_t>();
        scalar_t* y = t.output.mutable_data_ptr<scalar_t>();
        with_index_type(t.input.numel(), [&](auto index) {
          using index_t = decltype(index);
          switch (plan.kernel) {
            case Kernel::kWarpRows:
              forward_warp_rows_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(
                      x, y, l.outer, index_t(l.dim_size), plan.row_lanes);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kBlockRowShared:
            case Kernel::kBlockRowStreamed:
              with_block_row_flags(
                  use_vector_access({x, y}, l.dim_size, sizeof(scalar_t)), plan,
                  [&](auto vector, auto shared) {
                    launch_block_row(
                        forward_block_row_kernel<
                            scalar_t, index_t, decltype(vector)::value,
                            decltype(shared)::value>,
                        plan, stream, x, y, l.outer, index_t(l.dim_size));
                  });
              break;
            case Kernel::kColumns:
              forward_columns_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(x, y, l);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kColumnsSplitDim:
              forward_columns_split_dim_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(
                      x, y, l, plan.block_columns, plan.dim_slices);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kNone:
              break;
          }
        });
      });
  return t.output;
}

at::Tensor log_softmax_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  const auto t = ops::prepare_log_softmax_backward(grad_output, output, dim);
  const ops::LogSoftmaxLayout& l = t.layout;
  const c10::cuda::CUDAGuard device_guard(t.output.device());
  const LaunchPlan plan = plan_launch(
      l, t.output.element_size(), device_limits(t.output.device().index()));
  if (plan.kernel == Kernel::kNone) {
    return t.grad_input;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.output.scalar_type(),
      "log_softmax_backward_cuda", [&] {
        const scalar_t* dy = t.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = t.output.const_data_ptr<scalar_t>();
        scalar_t* dx = t.grad_input.mutable_data_ptr<scalar_t>();
        with_index_type(t.output.numel(), [&](auto index) {
          using index_t = decltype(index);
          switch (plan.kernel) {
            case Kernel::kWarpRows:
              backward_warp_rows_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(
                      dy, y, dx, l.outer, index_t(l.dim_size), plan.row_lanes);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kBlockRowShared:
            case Kernel::kBlockRowStreamed:
              with_block_row_flags(
                  use_vector_access({dy, y, dx}, l.dim_size, sizeof(scalar_t)),
                  plan, [&](auto vector, auto shared) {
                    launch_block_row(
                        backward_block_row_kernel<
                            scalar_t, index_t, decltype(vector)::value,
                            decltype(shared)::value>,
                        plan, stream, dy, y, dx, l.outer, index_t(l.dim_size));
                  });
              break;
            case Kernel::kColumns:
              backward_columns_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(dy, y, dx, l);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kColumnsSplitDim:
              backward_columns_split_dim_kernel<scalar_t, index_t>
                  <<<plan.blocks, plan.threads, 0, stream>>>(
                      dy, y, dx, l, plan.block_columns, plan.dim_slices);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              break;
            case Kernel::kNone:
              break;
          }
        });
      });
  return t.grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CUDA, m) {
  m.impl("log_softmax", &log_softmax_cuda);
  m.impl("_log_softmax_backward", &log_softmax_backward_cuda);
}

}  // namespace ptfast::cuda
