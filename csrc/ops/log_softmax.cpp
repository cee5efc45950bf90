// Schemas of log_softmax and its backward.
#include "ops/log_softmax.h"
#include "ops/checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
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

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def("log_softmax(Tensor self, int dim) -> Tensor");
  m.def(
      "_log_softmax_backward(Tensor grad_output, Tensor output, int dim) "
      "-> Tensor");
}

}  // namespace ptfast::ops
