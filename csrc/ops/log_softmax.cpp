// Schemas of log_softmax and its backward, and the argument checks and
// allocation shared by their backends.
#include "ops/log_softmax.h"
#include "ops/checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

namespace ptfast::ops {

at::Tensor log_softmax(const at::Tensor& self, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ptfast::log_softmax", "")
                             .typed<decltype(log_softmax)>();
  return op.call(self, dim);
}

at::Tensor _log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ptfast::_log_softmax_backward", "")
          .typed<decltype(_log_softmax_backward)>();
  return op.call(grad_output, output, dim);
}

namespace {

constexpr const char* kOp = "ptfast.log_softmax";

int64_t wrap_dim(int64_t dim, const at::Tensor& tensor) {
  const int64_t rank = std::max<int64_t>(tensor.dim(), 1);
  TORCH_CHECK_INDEX(
      dim >= -rank && dim < rank, kOp, ": `dim` must be in [", -rank, ", ",
      rank - 1, "] for a tensor of shape ", tensor.sizes(), ", got ", dim);
  return dim < 0 ? dim + rank : dim;
}

LogSoftmaxLayout layout_of(const at::Tensor& tensor, int64_t dim) {
  const auto sizes = tensor.sizes();
  LogSoftmaxLayout layout{1, tensor.dim() == 0 ? 1 : sizes[dim], 1};
  for (int64_t d = 0; d < dim; ++d) {
    layout.outer *= sizes[d];
  }
  for (int64_t d = dim + 1; d < tensor.dim(); ++d) {
    layout.inner *= sizes[d];
  }
  return layout;
}

}  // namespace

int64_t check_log_softmax_input(const at::Tensor& self, int64_t dim) {
  check_floating(kOp, self, "self");
  return wrap_dim(dim, self);
}

int64_t check_log_softmax_backward_input(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  check_floating(kOp, output, "output");
  TORCH_CHECK(
      grad_output.sizes() == output.sizes(), kOp,
      ": `grad_output` must have the shape of `output` ", output.sizes(),
      ", got ", grad_output.sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == output.scalar_type(), kOp,
      ": `grad_output` has dtype ", grad_output.scalar_type(),
      " but `output` has dtype ", output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == output.device(), kOp, ": `grad_output` is on ",
      grad_output.device(), " but `output` is on ", output.device());
  return wrap_dim(dim, output);
}

LogSoftmaxTensors prepare_log_softmax(const at::Tensor& self, int64_t dim) {
  LogSoftmaxTensors t;
  t.dim = check_log_softmax_input(self, dim);
  t.input = self.contiguous();
  t.output = at::empty(t.input.sizes(), t.input.options());
  t.layout = layout_of(t.input, t.dim);
  return t;
}

LogSoftmaxBackwardTensors prepare_log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  LogSoftmaxBackwardTensors t;
  t.dim = check_log_softmax_backward_input(grad_output, output, dim);
  t.grad_output = grad_output.contiguous();
  t.output = output.contiguous();
  t.grad_input = at::empty(t.output.sizes(), t.output.options());
  t.layout = layout_of(t.output, t.dim);
  return t;
}

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def("log_softmax(Tensor self, int dim) -> Tensor");
  m.def(
      "_log_softmax_backward(Tensor grad_output, Tensor output, int dim) "
      "-> Tensor");
}

}  // namespace ptfast::ops
