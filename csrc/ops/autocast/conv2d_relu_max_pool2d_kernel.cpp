// Autocast for the fused block: under torch.autocast("cuda") and
// torch.autocast("cpu") it runs in the autocast dtype, as conv2d does (a
// "lower precision" op on both devices; float64 tensors are left alone, as
// at::autocast::cached_cast leaves them for conv2d).
#include "ops/conv2d_relu_max_pool2d.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor conv2d_relu_max_pool2d_autocast(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return conv2d_relu_max_pool2d(
      at::autocast::cached_cast(dtype, input, device),
      at::autocast::cached_cast(dtype, weight, device),
      at::autocast::cached_cast(dtype, bias, device), stride, padding, dilation,
      groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, AutocastCUDA, m) {
  m.impl(
      "conv2d_relu_max_pool2d",
      &conv2d_relu_max_pool2d_autocast<
          c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(ptfast, AutocastCPU, m) {
  m.impl(
      "conv2d_relu_max_pool2d",
      &conv2d_relu_max_pool2d_autocast<
          c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace ptfast::ops
