"""What ``ptfast.fuse`` needs from torch.fx beyond its public API, kept in this one module.

* The tracer: it extends ``fx.Tracer``'s autowrap search (a private list) and makes every
  module's ``training`` flag a graph value while tracing.
* The result, ``FusedGraphModule``: ``GraphModule`` copies only what the graph references and,
  depending on the torch version, registers tensors it copies as persistent buffers (torch 2.13
  does for every tensor, 2.14 keeps a non-persistent buffer non-persistent), and its deep copy
  and pickling rebuild the module from the graph. ``FusedGraphModule`` builds itself, its deep
  copies and its unpickled copies the same way: a ``GraphModule`` for the code, then the module
  tree, buffers (persistence included), hooks and plain attributes put back explicitly from the
  source, whatever the version's own copying did.
"""

from __future__ import annotations

import copy
import linecache
import math
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ptfast import functional as _functional
from ptfast import nn as _ptnn
from ptfast._fuse.matchers import has_call_hooks
from ptfast._fuse.runtime import FuseError, check_dropout2d_chain_input

__all__ = ["FusedGraphModule", "trace"]

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



_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PTFAST_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # ptfast/
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
        if isinstance(m, (_ptnn.Conv2dReLUMaxPool2d, _ptnn.LogSoftmax)) or has_call_hooks(m):
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


def trace(model: nn.Module, name: str) -> tuple[fx.Graph, _FuseTracer]:
    """The graph of ``model.forward`` and the tracer that holds its ``training`` reads; FuseError if
    torch.fx cannot trace it (``name``: the model's class, for the message)."""
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
# The result: a GraphModule that keeps the original's module tree.


def _mirror(src: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the module tree, parameters, buffers, hooks and plain attributes of ``src``.

    GraphModule only copies what the graph references, may register tensor attributes as
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


def _module_with_state(state: dict[str, Any]) -> nn.Module:
    """A plain ``nn.Module`` whose ``__dict__`` is ``state`` (a fused module's, copied)."""
    module = nn.Module.__new__(nn.Module)
    module.__dict__.update(state)
    return module


def _unpickle(reduce_fn: Callable, args: tuple, name: str) -> "FusedGraphModule":
    # GraphModule's own rebuild serves only for the graph (traced again from the saved code);
    # everything else comes from the pickled state itself, as in a deep copy.
    state = dict(args[0])
    graph = reduce_fn(*args).graph
    gm = FusedGraphModule.__new__(FusedGraphModule)
    gm._build_from(_module_with_state(state), graph, name)
    return gm


class FusedGraphModule(fx.GraphModule):
    """The ``GraphModule`` ``ptfast.fuse`` returns; ``copy.deepcopy`` and pickling keep it whole:
    the same submodules, parameters, buffers (persistent or not), hooks and plain attributes."""

    @classmethod
    def build(cls, src: nn.Module, graph: fx.Graph, name: str) -> "FusedGraphModule":
        """The module running ``graph`` over ``src``'s module tree and attributes (shared, not copied)."""
        gm = cls.__new__(cls)
        gm._build_from(src, graph, name)
        return gm

    def _build_from(self, src: nn.Module, graph: fx.Graph, name: str) -> None:
        fx.GraphModule.__init__(self, src, graph, class_name=name)
        _mirror(src, self)

    def __reduce__(self):
        reduce_fn, args = super().__reduce__()
        return _unpickle, (reduce_fn, args, type(self).__name__)

    def __deepcopy__(self, memo: dict[int, Any]) -> "FusedGraphModule":
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        state = copy.deepcopy(self.__dict__, memo)
        res._build_from(_module_with_state(state), state["_graph"], type(self).__name__)
        return res
