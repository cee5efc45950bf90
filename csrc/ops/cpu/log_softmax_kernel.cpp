// CPU dispatch-key kernels of log_softmax: validate, lay out and allocate,
// then run the best vectorised copy of the kernel for this CPU
// (csrc/ops/cpu/isa/).
#include "ops/cpu/log_softmax_kernel.h"
#include "ops/checks.h"
#include "ops/log_softmax.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace ptfast::cpu {

IsaDispatch<LogSoftmaxForwardFn> log_softmax_forward_stub;
IsaDispatch<LogSoftmaxBackwardFn> log_softmax_backward_stub;

namespace {

constexpr const char* kOp = "ptfast.log_softmax";

at::Tensor log_softmax_cpu(const at::Tensor& self, int64_t dim) {
  const int64_t wrapped = ops::check_log_softmax_input(self, dim);
  ops::check_cpu_dtype(kOp, self, "self");
  const at::Tensor input = self.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  if (input.numel() > 0) {
    log_softmax_forward_stub.get("log_softmax")(input, output, wrapped);
  }
  return output;
}

at::Tensor log_softmax_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  const int64_t wrapped =
      ops::check_log_softmax_backward_input(grad_output, output, dim);
  ops::check_cpu_dtype(kOp, output, "output");
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor out = output.contiguous();
  at::Tensor grad_input = at::empty(out.sizes(), out.options());
  if (out.numel() > 0) {
    log_softmax_backward_stub.get("_log_softmax_backward")(
        grad, out, grad_input, wrapped);
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("log_softmax", &log_softmax_cpu);
  m.impl("_log_softmax_backward", &log_softmax_backward_cpu);
}

}  // namespace ptfast::cpu
