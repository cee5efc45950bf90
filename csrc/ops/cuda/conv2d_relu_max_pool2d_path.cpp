// The choice between the direct and the vendor path of the CUDA fused
// conv2d -> ReLU -> max_pool2d operator (see the header), and the private
// op that reports it to ptfast.backends.cuda.conv_block_path.
#include "ops/cuda/conv2d_relu_max_pool2d_path.h"

#include <torch/library.h>

namespace ptfast::cuda {

ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& /*shape*/,
    const ops::Conv2dReluMaxPool2dParams& /*params*/, ConvBlockPass pass) {
  const ConvBlockPath forced = ops::conv_block_policy(c10::DeviceType::CUDA);
  if (pass == ConvBlockPass::kBackward || forced == ConvBlockPath::kAuto) {
    return ConvBlockPath::kVendor;
  }
  return forced;
}

namespace {

// The path a CUDA call with these arguments takes (1 direct, 2 vendor).
// Only shapes are read, so it takes meta and CPU tensors.
int64_t conv_block_path(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool backward) {
  const auto params = ops::make_conv2d_relu_max_pool2d_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  const auto shape = ops::check_conv2d_relu_max_pool2d_inputs(
      input, weight, std::nullopt, params);
  return static_cast<int64_t>(choose_path(
      shape, params,
      backward ? ConvBlockPass::kBackward : ConvBlockPass::kForward));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def(
      "_conv2d_relu_max_pool2d_cuda_path(Tensor input, Tensor weight, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int[2] pool_kernel_size, int[2] pool_stride, int[2] pool_padding, "
      "bool ceil_mode, bool backward) -> int");
}

TORCH_LIBRARY_IMPL(ptfast, CompositeExplicitAutograd, m) {
  m.impl("_conv2d_relu_max_pool2d_cuda_path", &conv_block_path);
}

}  // namespace ptfast::cuda
