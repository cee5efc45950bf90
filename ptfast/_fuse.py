"""``ptfast.fuse``: rewrite a model to run on ptfast's fused operators, with torch.fx.

``fuse(model)`` traces ``model.forward`` with torch.fx and rewrites

* every ``conv2d -> ReLU -> max_pool2d`` chain (ReLU before or after the pool,
  an optional ``Dropout2d`` anywhere before the last of the two) into
  ``ptfast.conv2d_relu_max_pool2d``, the dropout (same module or call, same
  ``p``, same ``training``) moved after the fused op, and
* every ``log_softmax`` with an explicit ``dim`` into ``ptfast.log_softmax``,

and leaves every other node as it was. The result is a ``torch.fx.GraphModule``
over a deep copy of the model: the same submodules under the same names (so
``state_dict()`` keys, ``named_parameters()`` names and their order are the
original's), none of them shared with the original.

Why the rewrite is exact:

* ``relu(max_pool(y)) == max_pool(relu(y))`` (both monotone), so either order is
  one fused op;
* ``Dropout2d`` scales each (n, c) channel by 0 or 1/(1-p) >= 0, which commutes
  with ReLU and max-pooling; its mask has shape (N, C, 1, 1) whatever H and W,
  so drawn after the fused op it takes the same random numbers in the same
  order. (A 3-D input is different: torch's dropout2d then drops per (C, H)
  row, which does not commute with pooling, so the fused graph raises if a
  chain with a Dropout2d gets one while that dropout is in training mode.)

``training`` is kept dynamic: ``self.training`` read in a traced ``forward``
(e.g. the tutorial's ``F.dropout(x, training=self.training)``) becomes a read of
the fused module's own flag, so ``.train()`` / ``.eval()`` work on the result as
on the original. Only a Python branch on ``self.training`` (``if
self.training:``) is fixed at the mode the model was fused in; the fused graph
then checks the flag and raises if it is switched.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import math
import operator
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ptfast import functional as _functional
from ptfast import nn as _ptnn

__all__ = ["fuse", "FuseError"]


class FuseError(RuntimeError):
    """``ptfast.fuse`` could not rewrite a model (in practice: torch.fx could not trace it)."""


# --------------------------------------------------------------------------------------------
# Runtime helpers that fused graphs call.


def check_dropout2d_chain_input(input: torch.Tensor, training: bool) -> None:
    """Guard in front of a fused chain that contained a Dropout2d (see the module docstring)."""
    if training and input.dim() != 4:
        raise RuntimeError(
            "ptfast.fuse: a fused conv2d -> Dropout2d -> ReLU -> max_pool2d chain needs a batched 4-D "
            f"input while the dropout is in training mode, got shape {tuple(input.shape)}: torch's "
            "dropout2d treats a 3-D input as (N, C, L) and that does not commute with pooling. "
            "Add a batch dimension, or use the unfused model."
        )


# --------------------------------------------------------------------------------------------
# Tracing.

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PTFAST_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _has_call_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks that tracing through its forward (or replacing it) would drop."""
    return any(
        getattr(m, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _user_frame(tb) -> tuple[Any, int] | None:
    """The innermost frame of ``tb`` outside torch and ptfast (the model's code), and its line."""
    frames = list(traceback.walk_tb(tb))
    for frame, lineno in reversed(frames):
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and not filename.startswith(_PTFAST_DIR):
            return frame, lineno
    return frames[-1] if frames else None


def _user_location(frames) -> str:
    """'File "...", line N: <source>' for the innermost stack entry outside torch and ptfast."""
    for entry in reversed(frames):
        filename = os.path.abspath(entry.filename)
        if not filename.startswith(_TORCH_DIR) and not filename.startswith(_PTFAST_DIR):
            return f'File "{entry.filename}", line {entry.lineno}: {(entry.line or "").strip()}'
    return "an unknown location"


class _FuseTracer(fx.Tracer):
    """torch.fx tracer for ``fuse``.

    * ptfast's modules are leaves, and so is any module with forward/backward
      hooks (tracing through it would drop them);
    * ptfast's functions are recorded as calls (a fused model traces again);
    * every module's ``training`` flag is a graph value while tracing, so a
      model that passes ``self.training`` on keeps following ``.train()`` /
      ``.eval()``; a Python branch on it is taken with its current value and
      recorded in ``specialised`` (``fuse`` then guards the graph).
    """

    def __init__(self) -> None:
        super().__init__(
            autowrap_modules=(math,),
            autowrap_functions=(
                _functional.conv2d_relu_max_pool2d,
                _functional.log_softmax,
                check_dropout2d_chain_input,
            ),
        )
        # Also catch ``ptfast.conv2d_relu_max_pool2d(...)`` / ``ptfast.functional.log_softmax(...)``,
        # i.e. calls through the module attribute rather than an imported name.
        search = getattr(self, "_autowrap_search", None)
        if isinstance(search, list):
            search.extend(m for m in (sys.modules.get("ptfast"), _functional) if m is not None)
        self.training_nodes: dict[fx.Node, bool] = {}
        self.specialised: dict[fx.Node, str] = {}
        self._saved_training: list[tuple[nn.Module, bool]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ptnn.Conv2dReLUMaxPool2d, _ptnn.LogSoftmax)) or _has_call_hooks(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module:
            for name, module in self.root.named_modules():
                value = module.__dict__.get("training")
                if not isinstance(value, bool):
                    continue
                target = f"{name}.training" if name else "training"
                proxy = self.create_proxy("get_attr", target, (), {})
                self.training_nodes[proxy.node] = value
                self._saved_training.append((module, value))
                object.__setattr__(module, "training", proxy)
        return fn, args

    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        finally:
            for module, value in self._saved_training:
                object.__setattr__(module, "training", value)
            self._saved_training.clear()

    def to_bool(self, obj: fx.Proxy) -> bool:
        if obj.node in self.training_nodes:
            self.specialised.setdefault(obj.node, _user_location(traceback.extract_stack()))
            return self.training_nodes[obj.node]
        return super().to_bool(obj)


def _trace(model: nn.Module, name: str) -> tuple[fx.Graph, _FuseTracer]:
    tracer = _FuseTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001  (anything tracing raises means "not traceable")
        raise FuseError(_trace_failure_message(model, name, exc)) from exc
    return graph, tracer


def _trace_failure_message(model: nn.Module, name: str, exc: BaseException) -> str:
    where = ""
    found = _user_frame(exc.__traceback__)
    if found is not None:
        frame, lineno = found
        owner = frame.f_locals.get("self")
        paths = {id(m): path for path, m in model.named_modules()}
        if isinstance(owner, nn.Module) and id(owner) in paths:
            path = paths[id(owner)]
            who = f"submodule '{path}' ({type(owner).__name__})" if path else f"the root module ({name})"
            where = f"\n  in {who}, {frame.f_code.co_name}(),"
        else:
            where = f"\n  in {frame.f_code.co_name}(),"
        source = linecache.getline(frame.f_code.co_filename, lineno).strip()
        where += f' File "{frame.f_code.co_filename}", line {lineno}' + (f":\n    {source}" if source else "")
    return (
        f"ptfast.fuse: torch.fx cannot trace {name}: {type(exc).__name__}: {exc}{where}\n"
        "torch.fx runs forward() on symbolic values, so Python control flow that depends on tensor "
        "values or shapes (if/while on a tensor, loops over its size, .item(), .tolist(), numpy) cannot "
        "be traced. Fuse a traceable submodule instead (e.g. model.features = ptfast.fuse(model.features)), "
        "or build the model from ptfast.nn.Conv2dReLUMaxPool2d and ptfast.nn.LogSoftmax by hand."
    )


# --------------------------------------------------------------------------------------------
# Matching. Each matcher reads one node's arguments, positional or keyword, with the defaults
# of the function it stands for, and returns None where the node is not (safely) that op.


def _conv2d_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _f_max_pool2d_signature(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
): ...
def _torch_max_pool2d_signature(input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False): ...
def _f_relu_signature(input, inplace=False): ...
def _unary_signature(input): ...
def _dropout2d_signature(input, p=0.5, training=True, inplace=False): ...
def _f_log_softmax_signature(input, dim=None, _stacklevel=3, dtype=None): ...
def _torch_log_softmax_signature(input, dim, dtype=None): ...
def _special_log_softmax_signature(input, dim, *, dtype=None): ...


def _bind(signature_fn: Callable, node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(signature_fn).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(value: Any) -> tuple[int, int] | None:
    """An int or a 1-/2-sequence of ints as (h, w); None for anything else (e.g. a graph value)."""
    if _is_int(value):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2) and all(map(_is_int, value)):
        return (value[0], value[-1])
    return None


def _uses(node: fx.Node, value: fx.Node) -> int:
    count = 0

    def visit(arg):
        nonlocal count
        count += arg is value
        return arg

    fx.node.map_arg((node.args, node.kwargs), visit)
    return count


def _is_sole_input(node: fx.Node, value: fx.Node, bound: dict[str, Any] | None) -> bool:
    """``value`` is the node's ``input`` argument and is used nowhere else in the call."""
    return bound is not None and bound.get("input") is value and _uses(node, value) == 1


def _module_called_on(node: fx.Node, value: fx.Node | None, modules: dict[str, nn.Module], cls: type):
    """The module of ``node`` if it calls a hook-free instance of exactly ``cls`` on ``value`` alone."""
    if node.op != "call_module":
        return None
    module = modules.get(node.target)
    if type(module) is not cls or _has_call_hooks(module) or node.kwargs or len(node.args) != 1:
        return None
    if value is not None and node.args[0] is not value:
        return None
    return module


def _match_conv(node: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """``nn.Conv2d`` (exactly, zero padding, no hooks) or ``F.conv2d`` with constant hyper-parameters."""
    module = _module_called_on(node, None, modules, nn.Conv2d)
    if module is not None:
        if module.padding_mode != "zeros" or not isinstance(node.args[0], fx.Node):
            return None
        return dict(
            input=node.args[0],
            weight=f"{node.target}.weight",
            bias=None if module.bias is None else f"{node.target}.bias",
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
    if node.op != "call_function" or node.target is not torch.conv2d:
        return None
    args = _bind(_conv2d_signature, node)
    if args is None or not isinstance(args["input"], fx.Node) or not isinstance(args["weight"], fx.Node):
        return None
    if not (args["bias"] is None or isinstance(args["bias"], fx.Node)):
        return None
    stride, dilation, padding = _int_pair(args["stride"]), _int_pair(args["dilation"]), args["padding"]
    padding = padding if padding in ("same", "valid") else _int_pair(padding)
    if stride is None or dilation is None or padding is None or not _is_int(args["groups"]):
        return None
    return dict(
        input=args["input"], weight=args["weight"], bias=args["bias"],
        stride=stride, padding=padding, dilation=dilation, groups=args["groups"],
    )


def _match_relu(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """nn.ReLU (any inplace), F.relu (any inplace), torch.relu(_), F.relu_, x.relu(), x.relu_()."""
    if _module_called_on(node, value, modules, nn.ReLU) is not None:
        return True
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args == (value,) and not node.kwargs
    if node.op != "call_function":
        return False
    if node.target is F.relu:
        args = _bind(_f_relu_signature, node)
        return _is_sole_input(node, value, args) and isinstance(args["inplace"], bool)
    if node.target in (torch.relu, torch.relu_):
        return _is_sole_input(node, value, _bind(_unary_signature, node))
    return False


def _match_pool(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """nn.MaxPool2d / F.max_pool2d / torch.max_pool2d with dilation 1 and no indices returned."""
    module = _module_called_on(node, value, modules, nn.MaxPool2d)
    if module is not None:
        args = dict(
            kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, ceil_mode=module.ceil_mode, return_indices=module.return_indices,
        )
    elif node.op == "call_function" and node.target is F.max_pool2d:
        args = _bind(_f_max_pool2d_signature, node)
        if not _is_sole_input(node, value, args):
            return None
    elif node.op == "call_function" and node.target is torch.max_pool2d:
        args = _bind(_torch_max_pool2d_signature, node)
        if not _is_sole_input(node, value, args):
            return None
        args["return_indices"] = False
    else:
        return None
    if args["return_indices"] is not False or not isinstance(args["ceil_mode"], bool):
        return None
    if _int_pair(args["dilation"]) != (1, 1):
        return None
    kernel, padding, stride = _int_pair(args["kernel_size"]), _int_pair(args["padding"]), args["stride"]
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = None  # the kernel size, for F.max_pool2d and torch.max_pool2d alike
    elif (stride := _int_pair(stride)) is None:
        return None
    if kernel is None or padding is None:
        return None
    return dict(pool_kernel_size=kernel, pool_stride=stride, pool_padding=padding, ceil_mode=args["ceil_mode"])


def _match_dropout2d(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """nn.Dropout2d (exactly, no hooks) or F.dropout2d applied to ``value``; says where its flag is."""
    if _module_called_on(node, value, modules, nn.Dropout2d) is not None:
        return dict(training=f"{node.target}.training")
    if node.op == "call_function" and node.target is F.dropout2d:
        args = _bind(_dropout2d_signature, node)
        if _is_sole_input(node, value, args):
            return dict(training=args["training"])
    return None


# --------------------------------------------------------------------------------------------
# Rewriting.


def _fuse_chains(graph: fx.Graph, modules: dict[str, nn.Module], flags: dict[str, fx.Node]) -> int:
    """Rewrite every conv2d -> {ReLU, max_pool2d, optional Dropout2d} chain; return how many.

    ``flags`` maps "<module>.training" to the graph's reads of those flags.
    """
    count = 0
    for conv in list(graph.nodes):
        spec = _match_conv(conv, modules)
        if spec is None:
            continue
        chain: list[fx.Node] = []
        pool = dropout = None
        relu = False
        value = conv
        while not (relu and pool is not None):
            if len(value.users) != 1:
                break
            user = next(iter(value.users))
            if not relu and _match_relu(user, value, modules):
                relu = True
            elif pool is None and (found := _match_pool(user, value, modules)) is not None:
                pool = found
            elif dropout is None and (found := _match_dropout2d(user, value, modules)) is not None:
                dropout = (user, value, found)
            else:
                break
            chain.append(user)
            value = user
        if not (relu and pool is not None):
            continue

        with graph.inserting_before(conv):
            weight, bias = spec["weight"], spec["bias"]
            if isinstance(weight, str):
                weight = graph.get_attr(weight)
            if isinstance(bias, str):
                bias = graph.get_attr(bias)
            if dropout is not None:
                training = dropout[2]["training"]
                if isinstance(training, str):
                    training = flags[training] if training in flags else graph.get_attr(training)
                if training is not False:
                    graph.call_function(check_dropout2d_chain_input, (spec["input"], training))
            fused = graph.call_function(
                _functional.conv2d_relu_max_pool2d,
                (spec["input"], weight, bias),
                dict(stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"],
                     groups=spec["groups"], **pool),
            )
        fused.meta = dict(conv.meta)
        last = chain[-1]
        if dropout is None:
            last.replace_all_uses_with(fused)
        else:
            # The dropout node stays where it was (its random draws keep their place among the
            # model's other random calls), now applied to the fused output.
            node, old_input, _ = dropout
            last.replace_all_uses_with(node)
            node.replace_input_with(old_input, fused)
        for node in reversed([conv, *chain]):
            if dropout is None or node is not dropout[0]:
                graph.erase_node(node)
        count += 1
    return count


def _match_log_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, int, Any] | None:
    """(input, dim, dtype) of a log_softmax with an explicit int ``dim``, else None."""
    if node.op == "call_module":
        module = _module_called_on(node, None, modules, nn.LogSoftmax)
        if module is None or not _is_int(module.dim):
            return None
        return node.args[0], module.dim, None
    if node.op == "call_method" and node.target == "log_softmax":
        args = _bind(_torch_log_softmax_signature, node)
    elif node.op == "call_function" and node.target is F.log_softmax:
        args = _bind(_f_log_softmax_signature, node)
    elif node.op == "call_function" and node.target is torch.log_softmax:
        args = _bind(_torch_log_softmax_signature, node)
    elif node.op == "call_function" and node.target is torch.special.log_softmax:
        args = _bind(_special_log_softmax_signature, node)
    else:
        return None
    if args is None or not isinstance(args["input"], fx.Node) or not _is_int(args["dim"]):
        return None
    if not (args["dtype"] is None or isinstance(args["dtype"], torch.dtype)):
        return None
    return args["input"], args["dim"], args["dtype"]


def _fuse_log_softmax(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    count = 0
    for node in list(graph.nodes):
        found = _match_log_softmax(node, modules)
        if found is None:
            continue
        input, dim, dtype = found
        with graph.inserting_before(node):
            new = graph.call_function(
                _functional.log_softmax, (input, dim), {} if dtype is None else {"dtype": dtype}
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def _guard_training_branches(graph: fx.Graph, tracer: _FuseTracer, name: str) -> None:
    """Make the graph raise if a ``training`` flag it branched on at trace time is switched."""
    for node, where in tracer.specialised.items():
        value = tracer.training_nodes[node]
        owner = node.target[: -len(".training")] if node.target != "training" else ""
        message = (
            f"ptfast.fuse: this fused {name} was traced with {owner or 'the model'}.training={value}, "
            f"because its forward branches on it ({where}); it cannot run with training={not value}. "
            f"Fuse the model again in that mode (ptfast.fuse(model.{'train()' if not value else 'eval()'}))."
        )
        with graph.inserting_after(node):
            check = graph.call_function(operator.eq, (node, value))
        with graph.inserting_after(check):
            graph.call_function(torch._assert, (check, message))


# --------------------------------------------------------------------------------------------
# The result: a GraphModule that keeps the original's module tree.


def _mirror(src: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the module tree, parameters, buffers, hooks and plain attributes of ``src``.

    GraphModule only copies what the graph references, registers tensor attributes as
    persistent buffers and builds fresh containers for traced-through modules; this puts the
    original tree back, so state dicts, parameter names and their order, ``print(model)`` and
    submodules called directly are those of ``src``.
    """
    gm._modules.clear()
    gm._modules.update(src._modules)
    gm._parameters.clear()
    gm._parameters.update(src._parameters)
    extra = {k: v for k, v in gm._buffers.items() if k not in src._buffers}  # tensor constants
    gm._buffers.clear()
    gm._buffers.update(src._buffers)
    gm._buffers.update(extra)
    gm._non_persistent_buffers_set = set(src._non_persistent_buffers_set) | set(extra)
    for key in _HOOK_DICTS:
        if key in src.__dict__:
            gm.__dict__[key] = src.__dict__[key]
    registered = gm._modules.keys() | gm._parameters.keys() | gm._buffers.keys()
    for key, value in src.__dict__.items():
        if key not in gm.__dict__ and key not in registered and not hasattr(type(gm), key):
            gm.__dict__[key] = value
    object.__setattr__(gm, "training", src.training)


def _unpickle(reduce_fn: Callable, args: tuple, name: str) -> "FusedGraphModule":
    plain = reduce_fn(*args)
    gm = FusedGraphModule(plain, plain.graph, class_name=name)
    _mirror(plain, gm)
    body = args[0] if args and isinstance(args[0], dict) else {}
    for key in _HOOK_DICTS:
        if key in body:
            gm.__dict__[key] = body[key]
    return gm


class FusedGraphModule(fx.GraphModule):
    """The ``GraphModule`` ``ptfast.fuse`` returns; ``copy.deepcopy`` and pickling keep it whole.

    (``GraphModule`` rebuilds copies from the graph and drops the root's plain attributes and
    forward/backward hooks on the way; this class puts them back.)
    """

    def __reduce__(self):
        reduce_fn, args = super().__reduce__()
        return _unpickle, (reduce_fn, args, type(self).__name__)

    def __deepcopy__(self, memo: dict[int, Any]) -> "FusedGraphModule":
        res = super().__deepcopy__(memo)
        registered = res._modules.keys() | res._parameters.keys() | res._buffers.keys()
        for key, value in self.__dict__.items():
            if key in _HOOK_DICTS or (key not in res.__dict__ and key not in registered):
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res


def fuse(module: nn.Module) -> FusedGraphModule:
    """A copy of ``module`` whose conv2d -> ReLU -> max_pool2d chains and log_softmax run on ptfast.

    Matched (each op in module or functional form; everything else is left as it is):

    * ``nn.Conv2d`` (exactly that class, ``padding_mode='zeros'``, no hooks) or ``F.conv2d`` /
      ``torch.conv2d`` with constant stride/padding/dilation/groups, whose output feeds only
    * a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants too) and a
      max-pool (``nn.MaxPool2d``, ``F.max_pool2d``, ``torch.max_pool2d``, dilation 1, no indices)
      in either order, with optionally an ``nn.Dropout2d`` / ``F.dropout2d`` before the last of
      them; each intermediate value used by nothing else. The chain becomes one
      ``ptfast.conv2d_relu_max_pool2d`` call followed by the same dropout module or call;
    * ``F.log_softmax`` / ``torch.log_softmax`` / ``torch.special.log_softmax`` /
      ``x.log_softmax`` / ``nn.LogSoftmax`` with an explicit int ``dim`` become
      ``ptfast.log_softmax``; implicit-dim calls stay native.

    Not matched (stay native): a conv whose output is used twice, other conv classes or padding
    modes, a BatchNorm or anything else inside the chain, dilated or index-returning pools,
    modules with hooks, and anything inside ptfast.nn modules (already fused).

    The result is a ``torch.fx.GraphModule`` built on a deep copy of ``module``: it shares no
    parameters, buffers or submodules with ``module`` (which is not modified), and it has the
    same submodules under the same names, so ``state_dict()`` keys, ``named_parameters()``
    names and their order are ``module``'s and state dicts (and optimizer state dicts) load
    both ways. Build the optimizer from the fused model's parameters. Dropout masks come from
    the same random calls in the same order, so with the same seed the fused and the original
    model train identically (up to floating-point rounding). It follows ``.train()`` /
    ``.eval()`` like ``module``. The fused ops support the dtypes and devices ptfast does
    (float32/float64 on CPU). ``fuse`` of a fused model returns an equivalent copy.

    Raises:
        FuseError: torch.fx cannot trace ``module`` (e.g. control flow on tensor values); the
            message says in which submodule and on which line.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"ptfast.fuse: expected an nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    try:
        model = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001
        raise FuseError(
            f"ptfast.fuse: cannot deep-copy {name} ({type(exc).__name__}: {exc}); fuse works on a copy "
            "so that the original model is left as it is"
        ) from exc
    graph, tracer = _trace(model, name)
    modules = dict(model.named_modules())
    _fuse_chains(graph, modules, {node.target: node for node in tracer.training_nodes})
    _fuse_log_softmax(graph, modules)
    _guard_training_branches(graph, tracer, name)
    for node in tracer.training_nodes:
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    gm = FusedGraphModule(model, graph, class_name=name)
    _mirror(model, gm)
    return gm
