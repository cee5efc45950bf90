// Autograd of log_softmax: the forward saves only its output, from which the
// backward computes dx = dy - exp(y) * sum(dy). Differentiating the backward
// again is not supported: the backward op is registered with autograd's
// not-implemented fallback, which raises a clear error naming the op.
#include "ops/log_softmax.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LogSoftmaxFunction
    : public torch::autograd::Function<LogSoftmaxFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& self, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = ops::log_softmax(self, dim);
    ctx->save_for_backward({output});
    ctx->saved_data["dim"] = dim;
    return output;
  }

  static variable_list backward(
      AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {
        ops::_log_softmax_backward(
            grad_outputs[0], saved[0], ctx->saved_data.at("dim").toInt()),
        at::Tensor()};
  }
};

at::Tensor log_softmax_autograd(const at::Tensor& self, int64_t dim) {
  return LogSoftmaxFunction::apply(self, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, Autograd, m) {
  m.impl("log_softmax", &log_softmax_autograd);
  m.impl(
      "_log_softmax_backward",
      torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ptfast::ops
