// Autocast (CUDA) for log_softmax: torch's policy runs log_softmax in float32
// under torch.autocast("cuda"), and so does ptfast.
#include "ops/log_softmax.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

at::Tensor log_softmax_autocast(const at::Tensor& self, int64_t dim) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return ops::log_softmax(
      at::autocast::cached_cast(at::kFloat, self, c10::DeviceType::CUDA), dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, AutocastCUDA, m) {
  m.impl("log_softmax", &log_softmax_autocast);
}

}  // namespace ptfast::ops
