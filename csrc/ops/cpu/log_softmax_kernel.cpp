// CPU dispatch-key kernels of log_softmax: validate, lay out and allocate
// (ops::prepare_log_softmax*), then run the best vectorised copy of the kernel
// for this CPU (csrc/ops/cpu/isa/).
#include "ops/cpu/log_softmax_kernel.h"
#include "ops/checks.h"

#include <torch/library.h>

namespace ptfast::cpu {

IsaDispatch<LogSoftmaxForwardFn> log_softmax_forward_stub;
IsaDispatch<LogSoftmaxBackwardFn> log_softmax_backward_stub;

namespace {

constexpr const char* kOp = "ptfast.log_softmax";

at::Tensor log_softmax_cpu(const at::Tensor& self, int64_t dim) {
  const auto t = ops::prepare_log_softmax(self, dim);
  ops::check_cpu_dtype(kOp, t.input, "self");
  if (t.input.numel() > 0) {
    log_softmax_forward_stub.get("log_softmax")(t);
  }
  return t.output;
}

at::Tensor log_softmax_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  const auto t = ops::prepare_log_softmax_backward(grad_output, output, dim);
  ops::check_cpu_dtype(kOp, t.output, "output");
  if (t.output.numel() > 0) {
    log_softmax_backward_stub.get("_log_softmax_backward")(t);
  }
  return t.grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("log_softmax", &log_softmax_cpu);
  m.impl("_log_softmax_backward", &log_softmax_backward_cpu);
}

}  // namespace ptfast::cpu
