// Schemas of the fused conv2d -> ReLU -> max_pool2d operator, and the
// argument checks shared by its backends.
//
//   conv2d_relu_max_pool2d               the public op (no arg-max codes)
//   _conv2d_relu_max_pool2d_with_codes  also returns the arg-max codes the
//                                        backward needs (see geometry.h)
//   _conv2d_relu_max_pool2d_backward      gradients from those codes
#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

constexpr const char* kOp = "ptfast.conv2d_relu_max_pool2d";

std::array<int64_t, 2> pair_arg(c10::IntArrayRef values, const char* name) {
  TORCH_CHECK(
      values.size() == 2, kOp, ": `", name,
      "` must have two entries (height, width), got ", values);
  return {values[0], values[1]};
}

void check_positive(const std::array<int64_t, 2>& values, const char* name) {
  TORCH_CHECK(
      values[0] > 0 && values[1] > 0, kOp, ": `", name,
      "` must be positive, got ", c10::IntArrayRef(values));
}

void check_matches_input(
    const at::Tensor& tensor, const char* name, const at::Tensor& input) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == input.scalar_type(), kOp, ": `", name,
      "` has dtype ", tensor.scalar_type(), " but `input` has dtype ",
      input.scalar_type());
  TORCH_CHECK(
      tensor.device() == input.device(), kOp, ": `", name, "` is on ",
      tensor.device(), " but `input` is on ", input.device());
}

}  // namespace

Conv2dReluMaxPool2dParams make_conv2d_relu_max_pool2d_params(
    c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  Conv2dReluMaxPool2dParams p{
      pair_arg(stride, "stride"),
      pair_arg(padding, "padding"),
      pair_arg(dilation, "dilation"),
      groups,
      pair_arg(pool_kernel_size, "pool_kernel_size"),
      pair_arg(pool_stride, "pool_stride"),
      pair_arg(pool_padding, "pool_padding"),
      ceil_mode};
  check_positive(p.stride, "stride");
  check_positive(p.dilation, "dilation");
  check_positive(p.pool_kernel, "pool_kernel_size");
  check_positive(p.pool_stride, "pool_stride");
  TORCH_CHECK(groups > 0, kOp, ": `groups` must be positive, got ", groups);
  TORCH_CHECK(
      p.padding[0] >= 0 && p.padding[1] >= 0, kOp,
      ": `padding` must be non-negative, got ", padding);
  for (int axis = 0; axis < 2; ++axis) {
    TORCH_CHECK(
        p.pool_padding[axis] >= 0 &&
            p.pool_padding[axis] <= p.pool_kernel[axis] / 2,
        kOp, ": `pool_padding` must be between 0 and half of ",
        "`pool_kernel_size`, got pool_padding=", pool_padding,
        " and pool_kernel_size=", pool_kernel_size);
  }
  return p;
}

Conv2dReluMaxPool2dShape check_conv2d_relu_max_pool2d_inputs(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const Conv2dReluMaxPool2dParams& p) {
  TORCH_CHECK(
      input.dim() == 4, kOp, ": `input` must be 4-D (N, C, H, W), got ",
      input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK(
      weight.dim() == 4, kOp,
      ": `weight` must be 4-D (out_channels, in_channels / groups, kH, kW), "
      "got shape ",
      weight.sizes());
  check_floating(kOp, input, "input");
  check_matches_input(weight, "weight", input);

  Conv2dReluMaxPool2dShape s{};
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.in_h = input.size(2);
  s.in_w = input.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);

  TORCH_CHECK(
      s.out_channels > 0 && s.out_channels % p.groups == 0, kOp,
      ": `weight` has ", s.out_channels,
      " output channels, which must be a positive multiple of groups=",
      p.groups);
  TORCH_CHECK(
      s.kernel_h > 0 && s.kernel_w > 0 && weight.size(1) > 0, kOp,
      ": `weight` must not be empty, got shape ", weight.sizes());
  TORCH_CHECK(
      s.in_channels == weight.size(1) * p.groups, kOp, ": `input` has ",
      s.in_channels, " channels but `weight` of shape ", weight.sizes(),
      " with groups=", p.groups, " expects ", weight.size(1) * p.groups);

  if (bias.has_value() && bias->defined()) {
    check_matches_input(*bias, "bias", input);
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == s.out_channels, kOp,
        ": `bias` must have shape (", s.out_channels, ",), got ",
        bias->sizes());
  }

  s.conv_h = geometry::conv_output_size(
      s.in_h, s.kernel_h, p.stride[0], p.padding[0], p.dilation[0]);
  s.conv_w = geometry::conv_output_size(
      s.in_w, s.kernel_w, p.stride[1], p.padding[1], p.dilation[1]);
  TORCH_CHECK(
      s.conv_h > 0 && s.conv_w > 0, kOp, ": `weight` kernel ", s.kernel_h,
      "x", s.kernel_w, " (dilation ", c10::IntArrayRef(p.dilation),
      ") is larger than the padded `input` of ", s.in_h + 2 * p.padding[0],
      "x", s.in_w + 2 * p.padding[1]);

  s.pooled_h = geometry::pool_output_size(
      s.conv_h, p.pool_kernel[0], p.pool_stride[0], p.pool_padding[0],
      p.ceil_mode);
  s.pooled_w = geometry::pool_output_size(
      s.conv_w, p.pool_kernel[1], p.pool_stride[1], p.pool_padding[1],
      p.ceil_mode);
  TORCH_CHECK(
      s.pooled_h > 0 && s.pooled_w > 0, kOp, ": `pool_kernel_size` ",
      c10::IntArrayRef(p.pool_kernel), " (pool_padding ",
      c10::IntArrayRef(p.pool_padding), ") is larger than the conv output of ",
      s.conv_h, "x", s.conv_w);
  return s;
}

void check_conv2d_relu_max_pool2d_backward_inputs(
    const at::Tensor& grad_output, const at::Tensor& codes,
    const at::Tensor& input, const Conv2dReluMaxPool2dShape& s,
    const Conv2dReluMaxPool2dParams& p) {
  const std::array<int64_t, 4> pooled{
      s.batch, s.out_channels, s.pooled_h, s.pooled_w};
  TORCH_CHECK(
      grad_output.sizes() == c10::IntArrayRef(pooled), kOp,
      ": `grad_output` must have shape ", c10::IntArrayRef(pooled), ", got ",
      grad_output.sizes());
  check_matches_input(grad_output, "grad_output", input);
  TORCH_CHECK(
      codes.sizes() == c10::IntArrayRef(pooled), kOp,
      ": `codes` must have shape ", c10::IntArrayRef(pooled), ", got ",
      codes.sizes());
  TORCH_CHECK_TYPE(
      codes.scalar_type() == argmax_code_dtype(p), kOp,
      ": `codes` must have dtype ", argmax_code_dtype(p), ", got ",
      codes.scalar_type());
  TORCH_CHECK(
      codes.device() == input.device(), kOp, ": `codes` is on ", codes.device(),
      " but `input` is on ", input.device());
}

at::MemoryFormat conv2d_relu_max_pool2d_memory_format(
    const at::Tensor& input, const at::Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 weight.suggest_memory_format() ==
                     at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

ForwardTensors prepare_forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode, bool with_codes,
    ChooseKernelLayout choose_layout) {
  ForwardTensors t;
  t.params = make_conv2d_relu_max_pool2d_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  t.shape = check_conv2d_relu_max_pool2d_inputs(input, weight, bias, t.params);
  t.memory_format = conv2d_relu_max_pool2d_memory_format(input, weight);
  t.layout = choose_layout(t.shape, t.params);
  const bool native = t.layout == KernelLayout::kNative;
  t.input = native ? input : input.contiguous();
  t.weight = native ? weight : weight.contiguous();
  if (bias.has_value() && bias->defined()) {
    t.bias = native ? *bias : bias->contiguous();
  }
  const std::array<int64_t, 4> pooled{
      t.shape.batch, t.shape.out_channels, t.shape.pooled_h,
      t.shape.pooled_w};
  const auto format = native ? t.memory_format : at::MemoryFormat::Contiguous;
  t.output = at::empty(pooled, input.options().memory_format(format));
  if (with_codes) {
    t.codes = at::empty(
        pooled, input.options()
                    .dtype(argmax_code_dtype(t.params))
                    .memory_format(format));
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> forward_result(const ForwardTensors& t) {
  if (t.layout == KernelLayout::kNative) {
    return {t.output, t.codes};
  }
  return {
      t.output.contiguous(t.memory_format),
      t.codes.defined() ? t.codes.contiguous(t.memory_format) : t.codes};
}

BackwardTensors prepare_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask, ChooseKernelLayout choose_layout) {
  BackwardTensors t;
  t.params = make_conv2d_relu_max_pool2d_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  t.shape = check_conv2d_relu_max_pool2d_inputs(
      input, weight, std::nullopt, t.params);
  check_conv2d_relu_max_pool2d_backward_inputs(
      grad_output, codes, input, t.shape, t.params);
  t.memory_format = conv2d_relu_max_pool2d_memory_format(input, weight);
  t.layout = choose_layout(t.shape, t.params);
  const bool native = t.layout == KernelLayout::kNative;
  const auto format = native ? t.memory_format : at::MemoryFormat::Contiguous;
  t.grad_output = grad_output.contiguous(format);
  t.codes = codes.contiguous(format);
  t.input = native ? input : input.contiguous();
  t.weight = native ? weight : weight.contiguous();
  t.output_mask = output_mask;
  return t;
}

void allocate_gradients(BackwardTensors& t, at::ScalarType dtype) {
  const auto format = t.layout == KernelLayout::kNative
      ? t.memory_format
      : at::MemoryFormat::Contiguous;
  if (t.output_mask[0]) {
    t.grad_input = at::empty(
        t.input.sizes(), t.input.options().dtype(dtype).memory_format(format));
  }
  if (t.output_mask[1]) {
    t.grad_weight = at::empty(
        t.weight.sizes(),
        t.weight.options().dtype(dtype).memory_format(format));
  }
  if (t.output_mask[2]) {
    t.grad_bias =
        at::empty({t.shape.out_channels}, t.weight.options().dtype(dtype));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const BackwardTensors& t) {
  const auto native_format = [&](const at::Tensor& grad) {
    return grad.defined() ? grad.contiguous(t.memory_format) : grad;
  };
  return {
      native_format(t.grad_input), native_format(t.grad_weight), t.grad_bias};
}

geometry::PoolGeometry pool_geometry(
    const Conv2dReluMaxPool2dShape& s, const Conv2dReluMaxPool2dParams& p) {
  return {p.pool_kernel[0],  p.pool_kernel[1],  p.pool_stride[0],
          p.pool_stride[1],  p.pool_padding[0], p.pool_padding[1],
          s.pooled_h,        s.pooled_w};
}

at::ScalarType argmax_code_dtype(const Conv2dReluMaxPool2dParams& p) {
  return geometry::argmax_code_fits_uint8(p.pool_kernel[0], p.pool_kernel[1])
      ? at::kByte
      : at::kInt;
}

at::Tensor conv2d_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ptfast::conv2d_relu_max_pool2d", "")
          .typed<decltype(conv2d_relu_max_pool2d)>();
  return op.call(
      input, weight, bias, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_with_codes(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ptfast::_conv2d_relu_max_pool2d_with_codes", "")
          .typed<decltype(_conv2d_relu_max_pool2d_with_codes)>();
  return op.call(
      input, weight, bias, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ptfast::_conv2d_relu_max_pool2d_backward", "")
          .typed<decltype(_conv2d_relu_max_pool2d_backward)>();
  return op.call(
      grad_output, input, weight, codes, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask);
}

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def(
      "conv2d_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int[2] pool_kernel_size, int[2] pool_stride, int[2] pool_padding, "
      "bool ceil_mode) -> Tensor");
  m.def(
      "_conv2d_relu_max_pool2d_with_codes(Tensor input, Tensor weight, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int[2] pool_kernel_size, int[2] pool_stride, "
      "int[2] pool_padding, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "_conv2d_relu_max_pool2d_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor codes, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int[2] pool_kernel_size, "
      "int[2] pool_stride, int[2] pool_padding, bool ceil_mode, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

}  // namespace ptfast::ops
