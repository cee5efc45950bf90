// CUDA kernels of log_softmax and its backward, with at::opmath_type
// accumulation (float for half types) and 64-bit indexing.
//
// The tensor is viewed as (outer, dim_size, inner). Three layouts:
//   inner == 1, dim_size <= kMaxWarpRow  a group of up to 32 lanes per row,
//                                        several rows per warp for short rows;
//   inner == 1, longer rows              one block per row, 16-byte loads;
//   inner > 1                            one thread per (outer, inner) column,
//                                        neighbouring threads on neighbouring
//                                        columns so loads coalesce.
// The forward reads the input once for its maximum and sum together (online
// rescaling: s <- s * exp(m - m') + exp(x - m')), then once more to write.
#include "ops/log_softmax.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace ptfast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int64_t kMaxWarpRow = 1024;

// Running (max, sum of exp(x - max)) of a set of values.
template <typename acc_t>
struct MaxSum {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
__device__ MaxSum<acc_t> empty_max_sum() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

template <typename acc_t>
__device__ acc_t nan_max(acc_t a, acc_t b) {
  return isnan(a) ? a : (isnan(b) ? b : (a > b ? a : b));
}

// NaN and inf behave as in native log_softmax: a NaN, or +inf (exp(inf - inf)),
// makes the sum NaN; -inf contributes nothing.
template <typename acc_t>
__device__ MaxSum<acc_t> merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t max = nan_max(a.max, b.max);
  if (max == -std::numeric_limits<acc_t>::infinity()) {
    return {max, acc_t(0)};
  }
  return {max, a.sum * exp(a.max - max) + b.sum * exp(b.max - max)};
}

template <typename acc_t>
__device__ MaxSum<acc_t> add(MaxSum<acc_t> a, acc_t x) {
  return merge(a, MaxSum<acc_t>{x, acc_t(1)});
}

template <typename acc_t>
__device__ MaxSum<acc_t> shuffle_xor(MaxSum<acc_t> v, int offset, int width) {
  return {__shfl_xor_sync(0xffffffffu, v.max, offset, width),
          __shfl_xor_sync(0xffffffffu, v.sum, offset, width)};
}

template <typename acc_t>
__device__ acc_t group_sum(acc_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  }
  return v;
}

template <typename acc_t>
__device__ MaxSum<acc_t> group_max_sum(MaxSum<acc_t> v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v = merge(v, shuffle_xor(v, offset, width));
  }
  return v;
}

// Rows of at most kMaxWarpRow elements: `width` lanes (a power of two <= 32)
// per row, 32 / width rows per warp.
template <typename scalar_t>
__global__ void forward_rows_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    int64_t rows, int64_t length, int width) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % width;
  const int64_t groups_per_block = blockDim.x / width;
  for (int64_t row = blockIdx.x * groups_per_block + threadIdx.x / width;
       row - threadIdx.x / width < rows;
       row += int64_t(gridDim.x) * groups_per_block) {
    // Every lane of the warp takes part in the shuffles; rows past the end
    // only read nothing and write nothing.
    const bool valid = row < rows;
    const scalar_t* x = input + (valid ? row : 0) * length;
    MaxSum<acc_t> stats = empty_max_sum<acc_t>();
    for (int64_t i = lane; valid && i < length; i += width) {
      stats = add(stats, static_cast<acc_t>(x[i]));
    }
    stats = group_max_sum(stats, width);
    const acc_t log_sum = log(stats.sum);
    for (int64_t i = lane; valid && i < length; i += width) {
      output[row * length + i] = static_cast<scalar_t>(
          static_cast<acc_t>(x[i]) - stats.max - log_sum);
    }
  }
}

template <typename scalar_t>
__global__ void backward_rows_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    int64_t rows, int64_t length, int width) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % width;
  const int64_t groups_per_block = blockDim.x / width;
  for (int64_t row = blockIdx.x * groups_per_block + threadIdx.x / width;
       row - threadIdx.x / width < rows;
       row += int64_t(gridDim.x) * groups_per_block) {
    const bool valid = row < rows;
    const int64_t offset = (valid ? row : 0) * length;
    acc_t sum = 0;
    for (int64_t i = lane; valid && i < length; i += width) {
      sum += static_cast<acc_t>(grad_output[offset + i]);
    }
    sum = group_sum(sum, width);
    for (int64_t i = lane; valid && i < length; i += width) {
      grad_input[offset + i] = static_cast<scalar_t>(
          static_cast<acc_t>(grad_output[offset + i]) -
          exp(static_cast<acc_t>(output[offset + i])) * sum);
    }
  }
}

// Calls fn(i, value) for the row's elements this thread owns, with 16-byte
// loads over the aligned middle of the row.
template <typename scalar_t, typename Fn>
__device__ void for_each_owned(const scalar_t* row, int64_t length, const Fn& fn) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  struct alignas(16) Pack {
    scalar_t v[kPack];
  };
  const int64_t misaligned =
      (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(scalar_t);
  const int64_t head =
      misaligned == 0 ? 0 : std::min<int64_t>(kPack - misaligned, length);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    fn(i, row[i]);
  }
  const int64_t packs = (length - head) / kPack;
  const Pack* body = reinterpret_cast<const Pack*>(row + head);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack pack = body[p];
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      fn(head + p * kPack + k, pack.v[k]);
    }
  }
  for (int64_t i = head + packs * kPack + threadIdx.x; i < length;
       i += blockDim.x) {
    fn(i, row[i]);
  }
}

template <typename acc_t>
__device__ MaxSum<acc_t> block_max_sum(MaxSum<acc_t> value) {
  __shared__ MaxSum<acc_t> partial[kThreads / kWarp];
  value = group_max_sum(value, kWarp);
  if (threadIdx.x % kWarp == 0) {
    partial[threadIdx.x / kWarp] = value;
  }
  __syncthreads();
  value = partial[0];
  for (int w = 1; w < kThreads / kWarp; ++w) {
    value = merge(value, partial[w]);
  }
  __syncthreads();
  return value;
}

template <typename acc_t>
__device__ acc_t block_total(acc_t value) {
  __shared__ acc_t partial[kThreads / kWarp];
  value = group_sum(value, kWarp);
  if (threadIdx.x % kWarp == 0) {
    partial[threadIdx.x / kWarp] = value;
  }
  __syncthreads();
  value = partial[0];
  for (int w = 1; w < kThreads / kWarp; ++w) {
    value += partial[w];
  }
  __syncthreads();
  return value;
}

template <typename scalar_t>
__global__ void forward_long_rows_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    int64_t rows, int64_t length) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* x = input + row * length;
    MaxSum<acc_t> stats = empty_max_sum<acc_t>();
    for_each_owned(x, length, [&](int64_t, scalar_t v) {
      stats = add(stats, static_cast<acc_t>(v));
    });
    stats = block_max_sum(stats);
    const acc_t log_sum = log(stats.sum);
    scalar_t* y = output + row * length;
    for_each_owned(x, length, [&](int64_t i, scalar_t v) {
      y[i] = static_cast<scalar_t>(static_cast<acc_t>(v) - stats.max - log_sum);
    });
  }
}

template <typename scalar_t>
__global__ void backward_long_rows_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    int64_t rows, int64_t length) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* dy = grad_output + row * length;
    const scalar_t* y = output + row * length;
    acc_t sum = 0;
    for_each_owned(dy, length, [&](int64_t, scalar_t v) {
      sum += static_cast<acc_t>(v);
    });
    sum = block_total(sum);
    scalar_t* dx = grad_input + row * length;
    for_each_owned(dy, length, [&](int64_t i, scalar_t v) {
      dx[i] = static_cast<scalar_t>(
          static_cast<acc_t>(v) - exp(static_cast<acc_t>(y[i])) * sum);
    });
  }
}

template <typename scalar_t>
__global__ void forward_inner_kernel(
    const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
    ops::LogSoftmaxLayout l) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t column = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       column < l.outer * l.inner;
       column += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base =
        (column / l.inner) * l.dim_size * l.inner + column % l.inner;
    MaxSum<acc_t> stats = empty_max_sum<acc_t>();
    for (int64_t d = 0; d < l.dim_size; ++d) {
      stats = add(stats, static_cast<acc_t>(input[base + d * l.inner]));
    }
    const acc_t log_sum = log(stats.sum);
    for (int64_t d = 0; d < l.dim_size; ++d) {
      const int64_t at = base + d * l.inner;
      output[at] = static_cast<scalar_t>(
          static_cast<acc_t>(input[at]) - stats.max - log_sum);
    }
  }
}

template <typename scalar_t>
__global__ void backward_inner_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ output, scalar_t* __restrict__ grad_input,
    ops::LogSoftmaxLayout l) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t column = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       column < l.outer * l.inner;
       column += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base =
        (column / l.inner) * l.dim_size * l.inner + column % l.inner;
    acc_t sum = 0;
    for (int64_t d = 0; d < l.dim_size; ++d) {
      sum += static_cast<acc_t>(grad_output[base + d * l.inner]);
    }
    for (int64_t d = 0; d < l.dim_size; ++d) {
      const int64_t at = base + d * l.inner;
      grad_input[at] = static_cast<scalar_t>(
          static_cast<acc_t>(grad_output[at]) -
          exp(static_cast<acc_t>(output[at])) * sum);
    }
  }
}

int lanes_per_row(int64_t length) {
  int width = 1;
  while (width < kWarp && width < length) {
    width *= 2;
  }
  return width;
}

int64_t grid_for(int64_t items, int64_t per_block) {
  return std::max<int64_t>(
      1, std::min<int64_t>((items + per_block - 1) / per_block, 1 << 20));
}

at::Tensor log_softmax_cuda(const at::Tensor& self, int64_t dim) {
  const c10::cuda::CUDAGuard device_guard(self.device());
  const auto t = ops::prepare_log_softmax(self, dim);
  if (t.input.numel() == 0) {
    return t.output;
  }
  const ops::LogSoftmaxLayout& l = t.layout;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(), "log_softmax_cuda", [&] {
        const scalar_t* x = t.input.const_data_ptr<scalar_t>();
        scalar_t* y = t.output.mutable_data_ptr<scalar_t>();
        if (l.inner > 1) {
          forward_inner_kernel<<<grid_for(l.outer * l.inner, kThreads),
                                 kThreads, 0, stream>>>(x, y, l);
        } else if (l.dim_size <= kMaxWarpRow) {
          const int width = lanes_per_row(l.dim_size);
          forward_rows_kernel<<<grid_for(l.outer, kThreads / width), kThreads,
                                0, stream>>>(
              x, y, l.outer, l.dim_size, width);
        } else {
          forward_long_rows_kernel<<<grid_for(l.outer, 1), kThreads, 0,
                                     stream>>>(x, y, l.outer, l.dim_size);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return t.output;
}

at::Tensor log_softmax_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  const c10::cuda::CUDAGuard device_guard(output.device());
  const auto t = ops::prepare_log_softmax_backward(grad_output, output, dim);
  if (t.output.numel() == 0) {
    return t.grad_input;
  }
  const ops::LogSoftmaxLayout& l = t.layout;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.output.scalar_type(),
      "log_softmax_backward_cuda", [&] {
        const scalar_t* dy = t.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = t.output.const_data_ptr<scalar_t>();
        scalar_t* dx = t.grad_input.mutable_data_ptr<scalar_t>();
        if (l.inner > 1) {
          backward_inner_kernel<<<grid_for(l.outer * l.inner, kThreads),
                                  kThreads, 0, stream>>>(dy, y, dx, l);
        } else if (l.dim_size <= kMaxWarpRow) {
          const int width = lanes_per_row(l.dim_size);
          backward_rows_kernel<<<grid_for(l.outer, kThreads / width), kThreads,
                                 0, stream>>>(
              dy, y, dx, l.outer, l.dim_size, width);
        } else {
          backward_long_rows_kernel<<<grid_for(l.outer, 1), kThreads, 0,
                                      stream>>>(dy, y, dx, l.outer, l.dim_size);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return t.grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CUDA, m) {
  m.impl("log_softmax", &log_softmax_cuda);
  m.impl("_log_softmax_backward", &log_softmax_backward_cuda);
}

}  // namespace ptfast::cuda
