// CPU dispatch-key kernels of log_softmax: validate, lay out and allocate,
// then run the best vectorised copy of the kernel for this CPU
// (csrc/ops/cpu/isa/).
#include "ops/cpu/log_softmax_kernel.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace ptfast::cpu {

IsaDispatch<LogSoftmaxForwardFn> log_softmax_forward_stub;
IsaDispatch<LogSoftmaxBackwardFn> log_softmax_backward_stub;

namespace {

constexpr const char* kOp = "ptfast.log_softmax";

void check_floating(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(tensor.scalar_type()), kOp, ": `", name,
      "` must be a floating-point tensor, got ", tensor.scalar_type());
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble,
      kOp, ": `", name, "` must be float32 or float64 on CPU, got ",
      tensor.scalar_type());
}

// Wraps a negative dim; a 0-d tensor behaves as one element, as in torch.
int64_t wrap_dim(int64_t dim, const at::Tensor& tensor) {
  const int64_t rank = std::max<int64_t>(tensor.dim(), 1);
  TORCH_CHECK_INDEX(
      dim >= -rank && dim < rank, kOp, ": `dim` must be in [", -rank, ", ",
      rank - 1, "] for a tensor of shape ", tensor.sizes(), ", got ", dim);
  return dim < 0 ? dim + rank : dim;
}

at::Tensor log_softmax_cpu(const at::Tensor& self, int64_t dim) {
  check_floating(self, "self");
  const int64_t wrapped = wrap_dim(dim, self);
  const at::Tensor input = self.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  if (input.numel() > 0) {
    log_softmax_forward_stub.get("log_softmax")(
        input, output, self.dim() == 0 ? 0 : wrapped);
  }
  return output;
}

at::Tensor log_softmax_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  check_floating(output, "output");
  TORCH_CHECK(
      grad_output.sizes() == output.sizes(), kOp,
      ": `grad_output` must have the shape of `output` ", output.sizes(),
      ", got ", grad_output.sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == output.scalar_type(), kOp,
      ": `grad_output` has dtype ", grad_output.scalar_type(),
      " but `output` has dtype ", output.scalar_type());
  const int64_t wrapped = wrap_dim(dim, output);
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor out = output.contiguous();
  at::Tensor grad_input = at::empty(out.sizes(), out.options());
  if (out.numel() > 0) {
    log_softmax_backward_stub.get("log_softmax_backward")(
        grad, out, grad_input, output.dim() == 0 ? 0 : wrapped);
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("log_softmax", &log_softmax_cpu);
  m.impl("log_softmax_backward", &log_softmax_backward_cpu);
}

}  // namespace ptfast::cpu
