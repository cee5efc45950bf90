// Autograd of the fused conv2d -> ReLU -> max_pool2d operator.
//
// The forward saves input, weight and the arg-max codes (one byte per pooled
// output for windows of fewer than 255 elements); the conv output itself is
// never kept. The backward asks only for the gradients that are needed.
// Differentiating the backward again is not supported: the backward op and
// the op with codes are registered with autograd's not-implemented
// fallback, which raises a clear error naming the op. Nor is forward-mode
// AD: the kernel refuses a tangent rather than drop it.
//
// The backward node is built as ATen's own are (see node.h), so that
// torch.func transforms reach it.
#include "ops/autograd/node.h"
#include "ops/conv2d_relu_max_pool2d.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace ptfast::ops {
namespace {

using autograd::variable_list;
using torch::autograd::SavedVariable;

constexpr const char* kOp = "ptfast.conv2d_relu_max_pool2d";

// The forward's arguments besides the tensors, as the backward op takes them.
struct BlockArguments {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  std::vector<int64_t> pool_kernel_size, pool_stride, pool_padding;
  bool ceil_mode = false;

  // Every field, in the one order that compiled autograd's cache key, the
  // packed arguments and their schema all follow.
  template <class Self, class Visit>
  static void for_each(Self&& self, Visit&& visit) {
    visit(self.stride);
    visit(self.padding);
    visit(self.dilation);
    visit(self.groups);
    visit(self.pool_kernel_size);
    visit(self.pool_stride);
    visit(self.pool_padding);
    visit(self.ceil_mode);
  }
};

struct Conv2dReluMaxPool2dBackward : autograd::Node {
  std::string name() const override {
    return "PtfastConv2dReluMaxPool2dBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return apply_functional(
        grads, needs_input_grad(), input_.unpack(), weight_.unpack(),
        codes_.unpack(), arguments);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    codes_.reset_data();
  }

  void compiled_args(autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, /*is_output=*/false);
    args.collect(weight_, /*is_output=*/false);
    args.collect(codes_, /*is_output=*/false);
    BlockArguments::for_each(
        arguments, [&](const auto& value) { args.collect(value); });
  }

  variable_list apply_with_saved(
      const variable_list& grads,
      autograd::SwapSavedVariables& saved) override {
    saved.before(input_);
    saved.before(weight_);
    saved.before(codes_);
    autograd::PackedArgs args;
    for (bool needed : needs_input_grad()) {
      args.pack(needed);
    }
    args.pack(input_.unpack());
    args.pack(weight_.unpack());
    args.pack(codes_.unpack());
    BlockArguments::for_each(
        arguments, [&](const auto& value) { args.pack(value); });
    auto grad_inputs =
        autograd::apply_in_compiled_graph(*this, saved, grads, args);
    saved.after(input_);
    saved.after(weight_);
    saved.after(codes_);
    return grad_inputs;
  }

  // The backward as a pure function, which compiled autograd traces.
  static variable_list apply_functional(
      const variable_list& grads, std::array<bool, 3> needs_input_grad,
      const at::Tensor& input, const at::Tensor& weight,
      const at::Tensor& codes, const BlockArguments& a) {
    const bool any =
        needs_input_grad[0] || needs_input_grad[1] || needs_input_grad[2];
    if (!any || !grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [grad_input, grad_weight, grad_bias] =
        _conv2d_relu_max_pool2d_backward(
            grads[0], input, weight, codes, a.stride, a.padding, a.dilation,
            a.groups, a.pool_kernel_size, a.pool_stride, a.pool_padding,
            a.ceil_mode, needs_input_grad);
    return {grad_input, grad_weight, grad_bias};
  }

  static variable_list apply_functional_ivalue(
      const variable_list& grads, const std::vector<c10::IValue>& packed) {
    autograd::PackedArgs args(packed);
    std::array<bool, 3> needs_input_grad{};
    for (bool& needed : needs_input_grad) {
      needed = args.unpack<bool>();
    }
    const auto input = args.unpack<at::Tensor>();
    const auto weight = args.unpack<at::Tensor>();
    const auto codes = args.unpack<at::Tensor>();
    BlockArguments arguments;
    BlockArguments::for_each(arguments, [&](auto& value) {
      value = args.unpack<std::decay_t<decltype(value)>>();
    });
    return apply_functional(
        grads, needs_input_grad, input, weight, codes, arguments);
  }

  static std::vector<at::TypePtr> packed_schema() {
    std::vector<at::TypePtr> schema(
        3, autograd::IValuePacker<bool>::packed_type());
    schema.insert(
        schema.end(), 3, autograd::IValuePacker<at::Tensor>::packed_type());
    BlockArguments::for_each(BlockArguments{}, [&](const auto& value) {
      schema.push_back(
          autograd::IValuePacker<std::decay_t<decltype(value)>>::packed_type());
    });
    return schema;
  }

  std::array<bool, 3> needs_input_grad() const {
    return {
        task_should_compute_output(0), task_should_compute_output(1),
        task_should_compute_output(2)};
  }

  // The bias is not saved: its gradient needs only grad_output and codes.
  SavedVariable input_, weight_, codes_;
  BlockArguments arguments;
};

at::Tensor conv2d_relu_max_pool2d_autograd(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::isFwGradDefined(input) &&
          !torch::autograd::isFwGradDefined(weight) &&
          !torch::autograd::isFwGradDefined(bias),
      kOp,
      ": forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) "
      "is not supported");
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    // Inference: no arg-max codes to compute or keep.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_relu_max_pool2d(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode);
  }
  auto node = autograd::make_node<Conv2dReluMaxPool2dBackward>();
  node->set_next_edges(
      torch::autograd::collect_next_edges(input, weight, bias));
  node->arguments = {
      stride.vec(),           padding.vec(),     dilation.vec(),     groups,
      pool_kernel_size.vec(), pool_stride.vec(), pool_padding.vec(), ceil_mode};
  at::Tensor output, codes;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, codes) = _conv2d_relu_max_pool2d_with_codes(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode);
  }
  torch::autograd::set_history(output, node);
  node->input_ = SavedVariable(input, /*is_output=*/false);
  node->weight_ = SavedVariable(weight, /*is_output=*/false);
  node->codes_ = SavedVariable(codes, /*is_output=*/false);
  autograd::node_complete(node);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, Autograd, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_autograd);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      torch::autograd::autogradNotImplementedFallback());
  m.impl(
      "_conv2d_relu_max_pool2d_backward",
      torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ptfast::ops
