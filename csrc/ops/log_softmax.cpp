// Schemas of log_softmax and its backward.
#include "ops/log_softmax.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace ptfast::ops {

at::Tensor log_softmax(const at::Tensor& self, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ptfast::log_softmax", "")
                             .typed<decltype(log_softmax)>();
  return op.call(self, dim);
}

at::Tensor log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ptfast::log_softmax_backward", "")
          .typed<decltype(log_softmax_backward)>();
  return op.call(grad_output, output, dim);
}

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def("log_softmax(Tensor self, int dim) -> Tensor");
  m.def(
      "log_softmax_backward(Tensor grad_output, Tensor output, int dim) "
      "-> Tensor");
}

}  // namespace ptfast::ops
