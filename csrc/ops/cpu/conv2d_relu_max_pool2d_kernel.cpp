// CPU dispatch-key kernels of the fused conv2d -> ReLU -> max_pool2d
// operator: validate, lay out and allocate, then run the best vectorised
// copy of the kernel for this CPU (csrc/ops/cpu/isa/).
#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace ptfast::cpu {

IsaDispatch<ConvPoolForwardFn> conv_pool_forward_stub;
IsaDispatch<ConvPoolBackwardFn> conv_pool_backward_stub;

namespace {

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK_TYPE(
      input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
      "ptfast.conv2d_relu_max_pool2d: `input` must be float32 or float64 on "
      "CPU, got ",
      input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool with_codes) {
  const auto params = ops::make_conv_pool_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  const auto shape = ops::check_conv_pool_inputs(input, weight, bias, params);
  check_cpu_dtype(input);

  const at::Tensor input_c = input.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() && bias->defined()
      ? bias->contiguous()
      : at::Tensor();
  const std::array<int64_t, 4> pooled{
      shape.batch, shape.out_channels, shape.pooled_h, shape.pooled_w};
  at::Tensor output = at::empty(pooled, input.options());
  at::Tensor codes = with_codes
      ? at::empty(pooled, input.options().dtype(ops::argmax_code_dtype(params)))
      : at::Tensor();
  if (output.numel() > 0) {
    conv_pool_forward_stub.get("conv2d_relu_max_pool2d")(
        {input_c, weight_c, bias_c, output, codes, shape, params});
  }
  return {output, codes};
}

at::Tensor conv2d_relu_max_pool2d_cpu(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode) {
  return std::get<0>(forward(
      input, weight, bias, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode,
      /*with_codes=*/false));
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_indices_cpu(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode) {
  return forward(
      input, weight, bias, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode,
      /*with_codes=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& indices,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  const auto params = ops::make_conv_pool_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  const auto shape =
      ops::check_conv_pool_inputs(input, weight, std::nullopt, params);
  ops::check_conv_pool_backward_inputs(
      grad_output, indices, input, shape, params);
  check_cpu_dtype(input);

  at::Tensor grad_input = output_mask[0]
      ? at::empty(input.sizes(), input.options())
      : at::Tensor();
  at::Tensor grad_weight = output_mask[1]
      ? at::empty(weight.sizes(), weight.options())
      : at::Tensor();
  at::Tensor grad_bias = output_mask[2]
      ? at::empty({shape.out_channels}, weight.options())
      : at::Tensor();
  if (shape.batch == 0) {
    for (at::Tensor* grad : {&grad_weight, &grad_bias}) {
      if (grad->defined()) {
        grad->zero_();
      }
    }
    return {grad_input, grad_weight, grad_bias};
  }
  conv_pool_backward_stub.get("conv2d_relu_max_pool2d_backward")(
      {grad_output.contiguous(), indices.contiguous(), input.contiguous(),
       weight.contiguous(), grad_input, grad_weight, grad_bias, shape,
       params});
  ops::propagate_non_finite_like_native(
      input, weight, indices, grad_input, grad_weight, shape, params);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_cpu);
  m.impl(
      "conv2d_relu_max_pool2d_with_indices",
      &conv2d_relu_max_pool2d_with_indices_cpu);
  m.impl(
      "conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cpu);
}

}  // namespace ptfast::cpu
