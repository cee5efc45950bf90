// Autograd of the fused conv2d -> ReLU -> max_pool2d operator.
//
// The forward saves input, weight and the arg-max codes (one byte per pooled
// output for windows of fewer than 255 elements); the conv output itself is
// never kept. The backward asks only for the gradients that are needed.
// Differentiating the backward again is not supported: the backward op and
// the op with codes are registered with autograd's not-implemented
// fallback, which raises a clear error naming the op.
#include "ops/conv2d_relu_max_pool2d.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Conv2dReluMaxPool2dFunction
    : public torch::autograd::Function<Conv2dReluMaxPool2dFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
      c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
      c10::IntArrayRef pool_padding, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, codes] = _conv2d_relu_max_pool2d_with_codes(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode);
    ctx->save_for_backward({input, weight, codes});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["pool_kernel_size"] = pool_kernel_size.vec();
    ctx->saved_data["pool_stride"] = pool_stride.vec();
    ctx->saved_data["pool_padding"] = pool_padding.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static variable_list backward(
      AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& data = ctx->saved_data;
    const std::array<bool, 3> output_mask{
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        data.at("has_bias").toBool() && ctx->needs_input_grad(2)};
    auto [grad_input, grad_weight, grad_bias] =
        _conv2d_relu_max_pool2d_backward(
            grad_outputs[0], saved[0], saved[1], saved[2],
            data.at("stride").toIntVector(), data.at("padding").toIntVector(),
            data.at("dilation").toIntVector(), data.at("groups").toInt(),
            data.at("pool_kernel_size").toIntVector(),
            data.at("pool_stride").toIntVector(),
            data.at("pool_padding").toIntVector(),
            data.at("ceil_mode").toBool(), output_mask);
    // One entry per forward argument; the non-tensor ones get none.
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_relu_max_pool2d_autograd(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  const bool needs_grad = at::GradMode::is_enabled() &&
      (input.requires_grad() || weight.requires_grad() ||
       (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!needs_grad) {
    // Inference: no arg-max codes to compute or keep.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_relu_max_pool2d(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode);
  }
  return Conv2dReluMaxPool2dFunction::apply(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
      pool_stride, pool_padding, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, Autograd, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_autograd);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      torch::autograd::autogradNotImplementedFallback());
  m.impl(
      "_conv2d_relu_max_pool2d_backward",
      torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ptfast::ops
