// Autocast for log_softmax, following torch's policy per device: under
// torch.autocast("cuda") log_softmax runs in float32 (CUDA's "fp32" list);
// under torch.autocast("cpu") it is on no list, and runs in its input's
// dtype (float32 stays float32, bfloat16 and float16 stay as they are).
#include "ops/log_softmax.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

at::Tensor log_softmax_autocast_cuda(const at::Tensor& self, int64_t dim) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return ops::log_softmax(
      at::autocast::cached_cast(at::kFloat, self, c10::DeviceType::CUDA), dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, AutocastCUDA, m) {
  m.impl("log_softmax", &log_softmax_autocast_cuda);
}

TORCH_LIBRARY_IMPL(ptfast, AutocastCPU, m) {
  m.impl("log_softmax", torch::CppFunction::makeFallthrough());
}

}  // namespace ptfast::ops
