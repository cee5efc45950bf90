// Autograd of log_softmax: the forward saves only its output, from which the
// backward computes dx = dy - exp(y) * sum(dy). Differentiating the backward
// again is not supported: the backward op is registered with autograd's
// not-implemented fallback, which raises a clear error naming the op. Nor is
// forward-mode AD: the kernel refuses a tangent rather than drop it.
//
// The backward node is built as ATen's own are (see node.h), so that
// torch.func transforms reach it.
#include "ops/autograd/node.h"
#include "ops/log_softmax.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

using autograd::variable_list;
using torch::autograd::SavedVariable;

constexpr const char* kOp = "ptfast.log_softmax";

struct LogSoftmaxBackward : autograd::Node {
  std::string name() const override { return "PtfastLogSoftmaxBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return apply_functional(
        grads, task_should_compute_output(0),
        output_.unpack(autograd::owning_ptr(*this)), dim);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    output_.reset_data();
  }

  void compiled_args(autograd::CompiledNodeArgs& args) const override {
    args.collect(output_, /*is_output=*/true);
    args.collect(dim);
  }

  variable_list apply_with_saved(
      const variable_list& grads,
      autograd::SwapSavedVariables& saved) override {
    saved.before(output_);
    autograd::PackedArgs args;
    args.pack(task_should_compute_output(0));
    args.pack(output_.unpack(autograd::owning_ptr(*this)));
    args.pack(dim);
    auto grad_inputs =
        autograd::apply_in_compiled_graph(*this, saved, grads, args);
    saved.after(output_);
    return grad_inputs;
  }

  // The backward as a pure function, which compiled autograd traces.
  static variable_list apply_functional(
      const variable_list& grads, bool needs_input_grad,
      const at::Tensor& output, int64_t dim) {
    if (!needs_input_grad || !grads[0].defined()) {
      return {at::Tensor()};
    }
    return {_log_softmax_backward(grads[0], output, dim)};
  }

  static variable_list apply_functional_ivalue(
      const variable_list& grads, const std::vector<c10::IValue>& packed) {
    autograd::PackedArgs args(packed);
    const auto needs_input_grad = args.unpack<bool>();
    const auto output = args.unpack<at::Tensor>();
    const auto dim = args.unpack<int64_t>();
    return apply_functional(grads, needs_input_grad, output, dim);
  }

  static std::vector<at::TypePtr> packed_schema() {
    return {
        autograd::IValuePacker<bool>::packed_type(),
        autograd::IValuePacker<at::Tensor>::packed_type(),
        autograd::IValuePacker<int64_t>::packed_type()};
  }

  SavedVariable output_;
  int64_t dim = 0;
};

at::Tensor log_softmax_autograd(const at::Tensor& self, int64_t dim) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(self), kOp,
      ": forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) "
      "is not supported");
  autograd::NodePtr<LogSoftmaxBackward> node;
  if (torch::autograd::compute_requires_grad(self)) {
    node = autograd::make_node<LogSoftmaxBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(self));
    node->dim = dim;
  }
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = ops::log_softmax(self, dim);
  }
  if (node) {
    torch::autograd::set_history(output, node);
    node->output_ = SavedVariable(output, /*is_output=*/true);
    autograd::node_complete(node);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, Autograd, m) {
  m.impl("log_softmax", &log_softmax_autograd);
  m.impl(
      "_log_softmax_backward",
      torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ptfast::ops
