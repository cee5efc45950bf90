// Autocast (CUDA) for the fused block: under torch.autocast("cuda") it runs in
// the autocast dtype, as conv2d does (a "lower precision" op).
#include "ops/conv2d_relu_max_pool2d.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

at::Tensor conv2d_relu_max_pool2d_autocast(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const auto dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CUDA);
  const auto cast = [&](const at::Tensor& t) {
    return at::autocast::cached_cast(dtype, t, c10::DeviceType::CUDA);
  };
  return conv2d_relu_max_pool2d(
      cast(input), cast(weight),
      at::autocast::cached_cast(dtype, bias, c10::DeviceType::CUDA), stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, AutocastCUDA, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_autocast);
}

}  // namespace ptfast::ops
