// CUDA kernels of the fused conv2d -> ReLU -> max_pool2d operator.
//
// Forward: one thread per pooled output computes the conv values of its
// window directly (accumulating in at::opmath_type: float for half types),
// pools them with max_pool2d's rules and writes the arg-max code.
// Backward: every result is gathered by the thread or block that owns it, so
// no float atomics are used and repeated runs are bitwise identical. The
// gradient reaching a conv output is recomputed from the arg-max codes
// (geometry::gather_gradient), never stored; like the native dense backward,
// a conv output without gradient still contributes 0 * value, so NaN and inf
// propagate as in native torch.
#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/geometry.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace ptfast::cuda {
namespace {

namespace geo = ptfast::geometry;

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;

// Every size a kernel needs, passed by value.
struct Dims {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t conv_h, conv_w;
  int64_t stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
  int64_t in_group, out_group;
  geo::PoolGeometry pool;
};

Dims make_dims(
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  return {s.batch,          s.in_channels,     s.in_h,
          s.in_w,           s.out_channels,    s.kernel_h,
          s.kernel_w,       s.conv_h,          s.conv_w,
          p.stride[0],      p.stride[1],       p.padding[0],
          p.padding[1],     p.dilation[0],     p.dilation[1],
          s.in_channels_per_group(p), s.out_channels_per_group(p),
          ops::pool_geometry(s, p)};
}

int64_t blocks_for(int64_t items) {
  return std::min<int64_t>((items + kThreads - 1) / kThreads, 1 << 20);
}

// Conv output (n, oc, oh, ow), zero padding included as multiplications by 0
// (the im2col convention the CPU kernels follow too).
template <typename scalar_t, typename acc_t>
__device__ acc_t conv_at(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, int64_t n, int64_t oc, int64_t oh,
    int64_t ow, const Dims& d) {
  const int64_t group = oc / d.out_group;
  acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
  const scalar_t* w = weight + oc * d.in_group * d.kernel_h * d.kernel_w;
  for (int64_t c = 0; c < d.in_group; ++c) {
    const scalar_t* x = input +
        ((n * d.in_channels + group * d.in_group + c) * d.in_h) * d.in_w;
    for (int64_t kh = 0; kh < d.kernel_h; ++kh) {
      const int64_t ih = oh * d.stride_h - d.padding_h + kh * d.dilation_h;
      const bool row_inside = ih >= 0 && ih < d.in_h;
      for (int64_t kw = 0; kw < d.kernel_w; ++kw) {
        const int64_t iw = ow * d.stride_w - d.padding_w + kw * d.dilation_w;
        const acc_t value = row_inside && iw >= 0 && iw < d.in_w
            ? static_cast<acc_t>(x[ih * d.in_w + iw])
            : acc_t(0);
        acc += value * static_cast<acc_t>(*w++);
      }
    }
  }
  return acc;
}

template <typename scalar_t, typename code_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
    code_t* __restrict__ codes, Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total =
      d.batch * d.out_channels * d.pool.pooled_h * d.pool.pooled_w;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       index < total; index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pw = index % d.pool.pooled_w;
    const int64_t ph = (index / d.pool.pooled_w) % d.pool.pooled_h;
    const int64_t plane = index / (d.pool.pooled_w * d.pool.pooled_h);
    const int64_t oc = plane % d.out_channels;
    const int64_t n = plane / d.out_channels;
    const geo::Window wh = geo::pool_window(
        ph, d.pool.kernel_h, d.pool.stride_h, d.pool.padding_h, d.conv_h);
    const geo::Window ww = geo::pool_window(
        pw, d.pool.kernel_w, d.pool.stride_w, d.pool.padding_w, d.conv_w);
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_h = wh.begin;
    int64_t best_w = ww.begin;
    for (int64_t h = wh.begin; h < wh.end; ++h) {
      for (int64_t w = ww.begin; w < ww.end; ++w) {
        // Rounded to scalar_t first, as the native conv output is.
        const acc_t value = static_cast<acc_t>(static_cast<scalar_t>(
            conv_at<scalar_t, acc_t>(input, weight, bias, n, oc, h, w, d)));
        if (value > best || isnan(value)) {
          best = value;
          best_h = h;
          best_w = w;
        }
      }
    }
    const bool blocked = best <= acc_t(0);
    output[index] = static_cast<scalar_t>(blocked ? acc_t(0) : best);
    if (codes != nullptr) {
      codes[index] = static_cast<code_t>(
          blocked ? geo::kNoGradient
                  : geo::encode_argmax(
                        best_h - wh.origin, best_w - ww.origin,
                        d.pool.kernel_w));
    }
  }
}

// One thread per input element: the sum over the conv outputs that read it.
template <typename scalar_t, typename code_t>
__global__ void grad_input_kernel(
    const scalar_t* __restrict__ grad_output, const code_t* __restrict__ codes,
    const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_input,
    Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = d.batch * d.in_channels * d.in_h * d.in_w;
  const int64_t pooled = d.pool.pooled_h * d.pool.pooled_w;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       index < total; index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = index % d.in_w;
    const int64_t ih = (index / d.in_w) % d.in_h;
    const int64_t c = (index / (d.in_w * d.in_h)) % d.in_channels;
    const int64_t n = index / (d.in_w * d.in_h * d.in_channels);
    const int64_t group = c / d.in_group;
    const int64_t c_in_group = c % d.in_group;
    acc_t acc = 0;
    for (int64_t oc = group * d.out_group; oc < (group + 1) * d.out_group;
         ++oc) {
      const int64_t plane = (n * d.out_channels + oc) * pooled;
      const scalar_t* w =
          weight + (oc * d.in_group + c_in_group) * d.kernel_h * d.kernel_w;
      for (int64_t kh = 0; kh < d.kernel_h; ++kh) {
        const int64_t row = ih + d.padding_h - kh * d.dilation_h;
        if (row < 0 || row % d.stride_h != 0 || row / d.stride_h >= d.conv_h) {
          continue;
        }
        for (int64_t kw = 0; kw < d.kernel_w; ++kw) {
          const int64_t col = iw + d.padding_w - kw * d.dilation_w;
          if (col < 0 || col % d.stride_w != 0 ||
              col / d.stride_w >= d.conv_w) {
            continue;
          }
          const acc_t grad = geo::gather_gradient<acc_t>(
                                 grad_output + plane, codes + plane,
                                 row / d.stride_h, col / d.stride_w, d.pool)
                                 .sum;
          acc += grad * static_cast<acc_t>(w[kh * d.kernel_w + kw]);
        }
      }
    }
    grad_input[index] = static_cast<scalar_t>(acc);
  }
}

// Sums one value per thread over a block in a fixed order.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t partial[kReduceThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] += partial[threadIdx.x + stride];
    }
    __syncthreads();
  }
  return partial[0];
}

// One block per weight element (oc, c, kh, kw): the sum over images and conv
// outputs of gradient * input.
template <typename scalar_t, typename code_t>
__global__ void grad_weight_kernel(
    const scalar_t* __restrict__ grad_output, const code_t* __restrict__ codes,
    const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_weight,
    Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t element = blockIdx.x;
  const int64_t kw = element % d.kernel_w;
  const int64_t kh = (element / d.kernel_w) % d.kernel_h;
  const int64_t c_in_group = (element / (d.kernel_w * d.kernel_h)) % d.in_group;
  const int64_t oc = element / (d.kernel_w * d.kernel_h * d.in_group);
  const int64_t c = (oc / d.out_group) * d.in_group + c_in_group;
  const int64_t positions = d.conv_h * d.conv_w;
  const int64_t pooled = d.pool.pooled_h * d.pool.pooled_w;
  acc_t acc = 0;
  for (int64_t item = threadIdx.x; item < d.batch * positions;
       item += blockDim.x) {
    const int64_t n = item / positions;
    const int64_t oh = (item % positions) / d.conv_w;
    const int64_t ow = item % d.conv_w;
    const int64_t ih = oh * d.stride_h - d.padding_h + kh * d.dilation_h;
    const int64_t iw = ow * d.stride_w - d.padding_w + kw * d.dilation_w;
    const acc_t x = ih >= 0 && ih < d.in_h && iw >= 0 && iw < d.in_w
        ? static_cast<acc_t>(
              input[((n * d.in_channels + c) * d.in_h + ih) * d.in_w + iw])
        : acc_t(0);
    const int64_t plane = (n * d.out_channels + oc) * pooled;
    acc += geo::gather_gradient<acc_t>(
               grad_output + plane, codes + plane, oh, ow, d.pool)
               .sum *
        x;
  }
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) {
    grad_weight[element] = static_cast<scalar_t>(total);
  }
}

// One block per output channel: the sum of the gradients that pass ReLU.
template <typename scalar_t, typename code_t>
__global__ void grad_bias_kernel(
    const scalar_t* __restrict__ grad_output, const code_t* __restrict__ codes,
    scalar_t* __restrict__ grad_bias, Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t oc = blockIdx.x;
  const int64_t pooled = d.pool.pooled_h * d.pool.pooled_w;
  acc_t acc = 0;
  for (int64_t item = threadIdx.x; item < d.batch * pooled;
       item += blockDim.x) {
    const int64_t cell =
        ((item / pooled) * d.out_channels + oc) * pooled + item % pooled;
    if (static_cast<int64_t>(codes[cell]) != geo::kNoGradient) {
      acc += static_cast<acc_t>(grad_output[cell]);
    }
  }
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) {
    grad_bias[oc] = static_cast<scalar_t>(total);
  }
}

// The kernels index NCHW; forward_result and backward_result move the results
// into native's memory format.
ops::KernelLayout contiguous_layout(
    const ops::Conv2dReluMaxPool2dShape&,
    const ops::Conv2dReluMaxPool2dParams&) {
  return ops::KernelLayout::kContiguous;
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool with_codes) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto t = ops::prepare_forward(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
      pool_stride, pool_padding, ceil_mode, with_codes, contiguous_layout);
  if (t.output.numel() == 0) {
    return ops::forward_result(t);
  }
  const Dims dims = make_dims(t.shape, t.params);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(),
      "conv2d_relu_max_pool2d_cuda", [&] {
        ops::dispatch_code_type(
            ops::argmax_code_dtype(t.params), [&](auto code) {
              using code_t = decltype(code);
              forward_kernel<scalar_t, code_t>
                  <<<blocks_for(t.output.numel()), kThreads, 0, stream>>>(
                      t.input.const_data_ptr<scalar_t>(),
                      t.weight.const_data_ptr<scalar_t>(),
                      t.bias.defined() ? t.bias.const_data_ptr<scalar_t>()
                                       : nullptr,
                      t.output.mutable_data_ptr<scalar_t>(),
                      with_codes ? t.codes.mutable_data_ptr<code_t>() : nullptr,
                      dims);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
  return ops::forward_result(t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_relu_max_pool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto t = ops::prepare_backward(
      grad_output, input, weight, codes, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask,
      contiguous_layout);
  const Dims dims = make_dims(t.shape, t.params);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(),
      "conv2d_relu_max_pool2d_backward_cuda", [&] {
        ops::dispatch_code_type(t.codes.scalar_type(), [&](auto code) {
          using code_t = decltype(code);
          const scalar_t* grad = t.grad_output.const_data_ptr<scalar_t>();
          const code_t* codes = t.codes.const_data_ptr<code_t>();
          if (t.grad_input.defined() && t.grad_input.numel() > 0) {
            grad_input_kernel<scalar_t, code_t>
                <<<blocks_for(t.grad_input.numel()), kThreads, 0, stream>>>(
                    grad, codes, t.weight.const_data_ptr<scalar_t>(),
                    t.grad_input.mutable_data_ptr<scalar_t>(), dims);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (t.grad_weight.defined()) {
            grad_weight_kernel<scalar_t, code_t>
                <<<t.grad_weight.numel(), kReduceThreads, 0, stream>>>(
                    grad, codes, t.input.const_data_ptr<scalar_t>(),
                    t.grad_weight.mutable_data_ptr<scalar_t>(), dims);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (t.grad_bias.defined()) {
            grad_bias_kernel<scalar_t, code_t>
                <<<t.grad_bias.numel(), kReduceThreads, 0, stream>>>(
                    grad, codes, t.grad_bias.mutable_data_ptr<scalar_t>(), dims);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
  return ops::backward_result(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CUDA, m) {
  m.impl(
      "conv2d_relu_max_pool2d", &ops::ForwardKernels<&forward>::without_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&forward>::with_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_backward",
      &conv2d_relu_max_pool2d_backward_cuda);
}

}  // namespace ptfast::cuda
