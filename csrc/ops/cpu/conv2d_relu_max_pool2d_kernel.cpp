// CPU dispatch-key kernels of the fused conv2d -> ReLU -> max_pool2d
// operator: validate, lay out and allocate, then run the best vectorised
// copy of the kernel for this CPU (csrc/ops/cpu/isa/).
#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"
#include "ops/checks.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/col2im.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include <tuple>

namespace ptfast::cpu {

IsaDispatch<Conv2dReluMaxPool2dForwardFn> conv2d_relu_max_pool2d_forward_stub;
IsaDispatch<Conv2dReluMaxPool2dBackwardFn> conv2d_relu_max_pool2d_backward_stub;

namespace {

constexpr const char* kOp = "ptfast.conv2d_relu_max_pool2d";

// (N, OC, conv_h * conv_w) bool: conv outputs whose gradient is zero.
at::Tensor conv_positions_without_gradient(
    const at::Tensor& codes, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const at::Tensor code = codes.to(at::kLong);
  const at::Tensor position = (code - 1).clamp_min(0);
  const auto options = code.options();
  const at::Tensor oh = at::arange(s.pooled_h, options).view({1, 1, -1, 1}) *
          p.pool_stride[0] -
      p.pool_padding[0] + position.div(p.pool_kernel[1], "floor");
  const at::Tensor ow = at::arange(s.pooled_w, options).view({1, 1, 1, -1}) *
          p.pool_stride[1] -
      p.pool_padding[1] + position.remainder(p.pool_kernel[1]);
  const int64_t positions = s.conv_h * s.conv_w;
  // Windows without gradient scatter into one extra, discarded slot.
  const at::Tensor index = (oh * s.conv_w + ow)
                               .masked_fill(code == geometry::kNoGradient, positions);
  at::Tensor has_gradient = at::zeros(
      {s.batch, s.out_channels, positions + 1}, options.dtype(at::kBool));
  has_gradient.scatter_(2, index.flatten(2), true);
  return has_gradient.narrow(2, 0, positions).logical_not();
}

// The sparse backward adds nothing for conv outputs that receive no gradient,
// while the native composite multiplies their zero gradient by the input
// (for grad_weight) and by the weight (for grad_input): 0 * inf and 0 * NaN
// make NaN there. This sets those entries to NaN, so that non-finite values
// propagate exactly as in native torch. Only called when `input` (for
// grad_weight) or `weight` (for grad_input) holds a non-finite value.
void propagate_non_finite_like_native(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& codes,
    const at::Tensor& grad_input, const at::Tensor& grad_weight,
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const int64_t taps = in_group * s.kernel_h * s.kernel_w;
  const std::array<int64_t, 2> kernel{s.kernel_h, s.kernel_w};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor idle =
      conv_positions_without_gradient(codes, s, p).to(input.scalar_type());
  for (int64_t g = 0; g < p.groups; ++g) {
    const at::Tensor idle_g = idle.narrow(1, g * out_group, out_group);
    if (grad_weight.defined()) {
      // (N, taps, positions): which taps of each conv output read a
      // non-finite input value.
      const at::Tensor bad_taps = at::im2col(
          at::isfinite(input.narrow(1, g * in_group, in_group))
              .logical_not()
              .to(input.scalar_type()),
          kernel, p.dilation, p.padding, p.stride);
      const at::Tensor reached =
          at::matmul(idle_g, bad_taps.transpose(1, 2)).sum(0) > 0;
      grad_weight.narrow(0, g * out_group, out_group)
          .view({out_group, taps})
          .masked_fill_(reached, nan);
    }
    if (grad_input.defined()) {
      const at::Tensor bad_weight =
          at::isfinite(weight.narrow(0, g * out_group, out_group)
                           .reshape({out_group, taps}))
              .logical_not()
              .to(input.scalar_type());
      // (N, taps, positions) -> (N, in_group, H, W): inputs that a
      // non-finite weight meets at a conv output without gradient.
      const at::Tensor reached =
          at::col2im(
              at::matmul(bad_weight.t(), idle_g), {s.in_h, s.in_w}, kernel,
              p.dilation, p.padding, p.stride) > 0;
      grad_input.narrow(1, g * in_group, in_group).masked_fill_(reached, nan);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool with_codes) {
  const auto t = ops::prepare_forward(
      input, weight, bias, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, with_codes);
  ops::check_cpu_dtype(kOp, t.input, "input");
  if (t.output.numel() > 0) {
    conv2d_relu_max_pool2d_forward_stub.get("conv2d_relu_max_pool2d")(
        {t.input, t.weight, t.bias, t.output, t.codes, t.shape, t.params});
  }
  return {t.output, t.codes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  auto t = ops::prepare_backward(
      grad_output, input, weight, codes, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask);
  ops::check_cpu_dtype(kOp, t.input, "input");
  if (t.shape.batch == 0) {
    for (at::Tensor* grad : {&t.grad_weight, &t.grad_bias}) {
      if (grad->defined()) {
        grad->zero_();
      }
    }
    return {t.grad_input, t.grad_weight, t.grad_bias};
  }
  bool input_non_finite = false;
  bool weight_non_finite = false;
  conv2d_relu_max_pool2d_backward_stub.get("_conv2d_relu_max_pool2d_backward")(
      {t.grad_output, t.codes, t.input, t.weight, t.grad_input, t.grad_weight,
       t.grad_bias, t.shape, t.params, &input_non_finite, &weight_non_finite});
  if (input_non_finite || weight_non_finite) {
    propagate_non_finite_like_native(
        t.input, t.weight, t.codes,
        weight_non_finite ? t.grad_input : at::Tensor(),
        input_non_finite ? t.grad_weight : at::Tensor(), t.shape, t.params);
  }
  return {t.grad_input, t.grad_weight, t.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl(
      "conv2d_relu_max_pool2d", &ops::ForwardKernels<&forward>::without_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&forward>::with_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cpu);
}

}  // namespace ptfast::cpu
