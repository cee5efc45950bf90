"""ptfast's fused operators with the signatures of torch.nn.functional.

Both functions are thin, typed front ends to the ``torch.ops.ptfast.*``
operators: they normalise the arguments the way ``F.conv2d`` /
``F.max_pool2d`` / ``F.log_softmax`` accept them, and leave validation,
computation and autograd to the C++ operators. Eager calls on plain tensors
reach the operators through ``ptfast._C``'s direct bindings, which skip
torch.ops' boxing (about 1.4 us a call, as much as native log_softmax takes on
a small tensor); everything else (torch.compile, torch.export, FX tracing,
tensor subclasses, ``__torch_function__`` modes) goes through torch.ops. Both
call the same dispatcher operator: same kernels, autograd, torch.func and
dispatch-mode behaviour.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ptfast import _C

__all__ = ["conv2d_relu_max_pool2d", "log_softmax"]

IntOrPair = Union[int, Sequence[int]]

_OP = "ptfast.conv2d_relu_max_pool2d"


_is_compiling = torch.compiler.is_compiling
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _eager_entry_serves(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a block call may take ``ptfast._C``'s direct binding instead of torch.ops:
    eager mode, no ``__torch_function__`` mode, and every tensor argument a
    plain tensor or parameter (no subclass that overrides torch functions).
    torch.compile and torch.export trace the torch.ops branch. (log_softmax
    inlines the same test: a call of this function costs a tenth of a microsecond.)"""
    return (
        not _is_compiling()
        and not _torch_function_mode_enabled()
        and type(input) in _PLAIN_TENSOR_TYPES
        and type(weight) in _PLAIN_TENSOR_TYPES
        and (bias is None or type(bias) in _PLAIN_TENSOR_TYPES)
    )


def _pair(value: IntOrPair, name: str) -> list[int]:
    """An int or a 1- or 2-sequence of ints as [height, width]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value[0], value[-1]]
    raise TypeError(f"{_OP}: `{name}` must be an int or a pair of ints, got {value!r}")


def _same_padding(
    input: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[Tensor, list[int]]:
    """Input and symmetric padding for padding='same', as F.conv2d does it.

    When a total padding dilation * (kernel - 1) is odd, the extra row or
    column goes at the bottom or right, applied to the input beforehand.
    """
    if any(s != 1 for s in stride):
        raise ValueError(f"{_OP}: `padding`='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    symmetric = [t // 2 for t in total]
    extra = [t - 2 * s for t, s in zip(total, symmetric)]
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, symmetric


def block_arguments(
    input: Tensor,
    weight: Tensor,
    stride: IntOrPair,
    padding: IntOrPair | str,
    dilation: IntOrPair,
    groups: int,
    pool_kernel_size: IntOrPair,
    pool_stride: IntOrPair | None,
    pool_padding: IntOrPair,
    ceil_mode: bool,
) -> tuple[Tensor, list]:
    """The arguments of conv2d_relu_max_pool2d as ``torch.ops.ptfast`` takes them: the input
    made 4-D (N, C_in, H, W) (and padded for an asymmetric 'same'), and the list
    [stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode]
    with every size a [height, width] pair. For ptfast's own front ends (also
    ptfast.backends.cpu.conv_block_path); errors name the argument.
    """
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{_OP}: `input` and `weight` must be tensors")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"{_OP}: `input` must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{_OP}: `groups` must be an int, got {groups!r}")
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"{_OP}: `ceil_mode` must be a bool, got {ceil_mode!r}")
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    pool_kernel_size = _pair(pool_kernel_size, "pool_kernel_size")
    pool_stride = pool_kernel_size if pool_stride is None else _pair(pool_stride, "pool_stride")
    pool_padding = _pair(pool_padding, "pool_padding")

    if input.dim() == 3:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            input, padding = _same_padding(input, weight.shape[2:], stride, dilation)
        else:
            raise ValueError(f"{_OP}: `padding` must be 'valid', 'same', an int or a pair, got {padding!r}")
    else:
        padding = _pair(padding, "padding")

    return input, [stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode]


def conv2d_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    pool_kernel_size: IntOrPair = 2,
    pool_stride: IntOrPair | None = None,
    pool_padding: IntOrPair = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
    pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode)`` as one fused op.

    Shapes:
        input:  (N, C_in, H, W) or unbatched (C_in, H, W)
        weight: (C_out, C_in / groups, kH, kW)
        bias:   (C_out,) or None
        output: (N, C_out, H_pool, W_pool), or (C_out, H_pool, W_pool) if unbatched

    Arguments take the values ``F.conv2d`` and ``F.max_pool2d`` take: ints or
    (height, width) pairs, ``padding`` also 'valid' or 'same', and
    ``pool_stride=None`` meaning ``pool_kernel_size``. The backward keeps only
    one arg-max code per pooled output (see README, "How it works", **Backward.**).
    """
    unbatched = isinstance(input, Tensor) and input.dim() == 3
    input, arguments = block_arguments(
        input, weight, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode
    )
    if _eager_entry_serves(input, weight, bias):
        output = _C._conv2d_relu_max_pool2d(input, weight, bias, *arguments)
    else:
        output = torch.ops.ptfast.conv2d_relu_max_pool2d(input, weight, bias, *arguments)
    return output.squeeze(0) if unbatched else output


def log_softmax(input: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``F.log_softmax(input, dim, dtype=dtype)``: numerically stable, any dim.

    Shapes: input (*), output (*), the same shape. With ``dtype`` the input is
    cast to it first, as in torch.
    """
    if type(dim) is not int and (not isinstance(dim, int) or isinstance(dim, bool)):
        raise TypeError(f"ptfast.log_softmax: `dim` must be an int, got {dim!r}")
    if dtype is not None:
        input = input.to(dtype)
    if not _is_compiling() and not _torch_function_mode_enabled() and type(input) in _PLAIN_TENSOR_TYPES:
        return _C._log_softmax(input, dim)
    return torch.ops.ptfast.log_softmax(input, dim)
