// What the autograd nodes of ptfast's operators share.
//
// Each operator's Autograd kernel builds its backward node the way ATen's
// generated VariableType kernels do (collect_next_edges, set_history,
// SavedVariable), not through torch::autograd::Function. torch.func refuses a
// C++ Function under any transform ("cannot use C++ torch::autograd::Function
// with functorch transforms"): it runs the forward with grad mode off, and
// only Python's autograd.Function has the per-level handling that nested
// transforms need. A node built as native ops' are is recorded at each
// transform level as theirs are.
//
// Compiled autograd asks every node what it saves (compiled_args) and for a
// pure function of its grads and saved values to put into its graph
// (apply_with_saved); apply_in_compiled_graph is that call, done once here.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/version.h>

#include <mutex>
#include <vector>

namespace ptfast::ops::autograd {

using torch::autograd::Node;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::IValuePacker;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// torch 2.13 holds autograd nodes by c10::intrusive_ptr; earlier releases by
// std::shared_ptr, released through deleteNode (which frees a long graph
// without deep recursion).
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 13
template <class T>
using NodePtr = std::shared_ptr<T>;

template <class T>
NodePtr<T> make_node() {
  return NodePtr<T>(new T(), torch::autograd::deleteNode);
}

inline std::shared_ptr<Node> owning_ptr(Node& node) {
  return node.shared_from_this();
}
#else
template <class T>
using NodePtr = c10::intrusive_ptr<T>;

template <class T>
NodePtr<T> make_node() {
  return c10::make_intrusive<T>();
}

inline c10::intrusive_ptr<Node> owning_ptr(Node& node) { return node.getptr(); }
#endif

// Once a node is complete (outputs attached, variables saved): torch 2.14
// runs torch.autograd.graph's node creation hooks then, as for its own nodes.
template <class T>
void node_complete(const NodePtr<T>& node) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 14
  torch::autograd::fire_node_creation_hooks(node);
#endif
}

// Puts T::apply_functional_ivalue(grads, args) into compiled autograd's graph
// and returns its (proxy) results; the caller has swapped its saved
// variables for the graph's before packing `args`.
template <class T>
variable_list apply_in_compiled_graph(
    const T& node, SwapSavedVariables& saved, const variable_list& grads,
    const PackedArgs& args) {
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  // Bound by name into one process-wide namespace, so once.
  static std::once_flag bound;
  std::call_once(bound, [&] {
    compiler->bind_function(
        saved.get_py_compiler(), node.name(), T::apply_functional_ivalue,
        T::packed_schema());
  });
  const auto output_metadata =
      IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::
          pack(torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  return compiler->call_function(
      saved.get_py_compiler(), "apply_functional", node.name(), grads,
      args.vec(), output_metadata);
}

}  // namespace ptfast::ops::autograd
