"""The patterns ``ptfast.fuse`` rewrites: which torch.fx nodes are a conv2d, a ReLU, a max-pool, a
Dropout2d, a log_softmax.

Pure functions of a node, its arguments and the model's modules, written against torch.fx's
public Node API. Each matcher reads one node's arguments, positional or keyword, with the defaults
of the function it stands for, and returns None where the node is not (safely) that op.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "has_call_hooks",
    "is_int",
    "match_conv",
    "match_dropout2d",
    "match_log_softmax",
    "match_pool",
    "match_relu",
]


def has_call_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks that tracing through its forward (or replacing it) would drop."""
    return any(
        getattr(m, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(value: Any) -> tuple[int, int] | None:
    """An int or a 1-/2-sequence of ints as (h, w); None for anything else (e.g. a graph value)."""
    if is_int(value):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2) and all(map(is_int, value)):
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
    if type(module) is not cls or has_call_hooks(module) or node.kwargs or len(node.args) != 1:
        return None
    if value is not None and node.args[0] is not value:
        return None
    return module


def match_conv(node: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
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
    if stride is None or dilation is None or padding is None or not is_int(args["groups"]):
        return None
    return dict(
        input=args["input"], weight=args["weight"], bias=args["bias"],
        stride=stride, padding=padding, dilation=dilation, groups=args["groups"],
    )


def match_relu(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
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


def match_pool(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
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


def match_dropout2d(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """nn.Dropout2d (exactly, no hooks) or F.dropout2d applied to ``value``; says where its flag is."""
    if _module_called_on(node, value, modules, nn.Dropout2d) is not None:
        return dict(training=f"{node.target}.training")
    if node.op == "call_function" and node.target is F.dropout2d:
        args = _bind(_dropout2d_signature, node)
        if _is_sole_input(node, value, args):
            return dict(training=args["training"])
    return None


def match_log_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, int, Any] | None:
    """(input, dim, dtype) of a log_softmax with an explicit int ``dim``, else None."""
    if node.op == "call_module":
        module = _module_called_on(node, None, modules, nn.LogSoftmax)
        if module is None or not is_int(module.dim):
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
    if args is None or not isinstance(args["input"], fx.Node) or not is_int(args["dim"]):
        return None
    if not (args["dtype"] is None or isinstance(args["dtype"], torch.dtype)):
        return None
    return args["input"], args["dim"], args["dtype"]
