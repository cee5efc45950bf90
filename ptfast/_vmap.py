"""Batching rules of the ptfast operators, so that torch.vmap (and torch.func's
jacrev, per-sample gradients, ...) runs each op once for the whole batch
instead of through torch's slow per-sample fallback.

They are registered with ``torch.library.register_vmap``, torch's documented
way to give an operator defined in C++ a batching rule. The C++ alternative, a
kernel on the FuncTorchBatched dispatch key, would need ATen's internal
functorch headers, part of whose helpers libtorch does not even export.

Each rule only rearranges tensors around one call of the op itself. The
vmapped dimension goes into the batch when every sample shares the weights;
when the weights (or bias) differ by sample, or when the weight gradient must
be kept per sample, it goes into the channels and multiplies ``groups``, as
torch's own batching rule for convolution does: sample b's channels form their
own groups, convolved with sample b's weights only.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

_BLOCK = "ptfast.conv2d_relu_max_pool2d"


def _batch_first(tensor: Tensor, bdim: Optional[int], batch_size: int) -> Tensor:
    """``tensor`` with its vmapped dimension first; a tensor without one is expanded (no copy)."""
    if bdim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(bdim, 0)


def _logical_shape(tensor: Tensor, bdim: Optional[int]) -> list[int]:
    """The shape one sample sees."""
    shape = list(tensor.shape)
    if bdim is not None:
        del shape[bdim]
    return shape


def _softmax_dim(dim: int, shape: Sequence[int]) -> int:
    """``dim`` of a sample of ``shape`` as a non-negative index, checked as the op checks it."""
    rank = max(len(shape), 1)
    if not -rank <= dim < rank:
        raise RuntimeError(
            f"ptfast.log_softmax: `dim` must be in [{-rank}, {rank - 1}] for a tensor of shape "
            f"{list(shape)}, got {dim}"
        )
    return dim % rank


def _log_softmax_call(op: Callable[..., Tensor], tensors: list[Tensor], dim: int) -> tuple[Tensor, int]:
    """``op(*tensors, dim)`` on batch-first tensors of one shape, the batch kept at dimension 0."""
    if tensors[0].dim() == 1:
        # A 0-d sample: its softmax is over its one element, made a dimension here.
        return op(*(t.unsqueeze(1) for t in tensors), 1).squeeze(1), 0
    return op(*tensors, dim + 1), 0


@torch.library.register_vmap("ptfast::log_softmax")
def _log_softmax_vmap(info, in_dims: tuple, self: Tensor, dim: int) -> tuple[Tensor, int]:
    dim = _softmax_dim(dim, _logical_shape(self, in_dims[0]))
    return _log_softmax_call(torch.ops.ptfast.log_softmax, [self.movedim(in_dims[0], 0)], dim)


@torch.library.register_vmap("ptfast::_log_softmax_backward")
def _log_softmax_backward_vmap(
    info, in_dims: tuple, grad_output: Tensor, output: Tensor, dim: int
) -> tuple[Tensor, int]:
    dim = _softmax_dim(dim, _logical_shape(output, in_dims[1]))
    tensors = [_batch_first(t, bdim, info.batch_size) for t, bdim in zip((grad_output, output), in_dims)]
    return _log_softmax_call(torch.ops.ptfast._log_softmax_backward, tensors, dim)


def _check_block_ranks(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], in_dims: tuple
) -> None:
    """The op's own rank checks, per sample: folding the vmapped dimension into another
    would let a wrong rank through."""
    input_shape = _logical_shape(input, in_dims[0])
    weight_shape = _logical_shape(weight, in_dims[1])
    if len(input_shape) != 4:
        raise RuntimeError(
            f"{_BLOCK}: `input` must be 4-D (N, C, H, W), got {len(input_shape)}-D with shape {input_shape}"
        )
    if len(weight_shape) != 4:
        raise RuntimeError(
            f"{_BLOCK}: `weight` must be 4-D (out_channels, in_channels / groups, kH, kW), got shape {weight_shape}"
        )
    if bias is not None and _logical_shape(bias, in_dims[2]) != weight_shape[:1]:
        raise RuntimeError(
            f"{_BLOCK}: `bias` must have shape ({weight_shape[0]},), got {_logical_shape(bias, in_dims[2])}"
        )


def _block_forward_vmap(
    op: Callable[..., Tensor | tuple[Tensor, ...]],
    info,
    in_dims: tuple,
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    *pooling,
) -> tuple[list[Tensor], int]:
    """The outputs of the fused forward ``op`` (the public op or the one with codes) for the
    whole batch, and the dimension that holds the vmapped one in each."""
    _check_block_ranks(input, weight, bias, in_dims)
    input_bdim, weight_bdim, bias_bdim = in_dims[:3]
    batch = info.batch_size
    if weight_bdim is None and bias_bdim is None:
        input = input.movedim(input_bdim, 0)
        outputs = op(input.flatten(0, 1), weight, bias, stride, padding, dilation, groups, *pooling)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [t.unflatten(0, (batch, input.shape[1])) for t in outputs], 0
    weight = _batch_first(weight, weight_bdim, batch)
    out_channels = weight.shape[1]
    weight = weight.flatten(0, 1)
    if bias is not None:
        bias = _batch_first(bias, bias_bdim, batch).flatten(0, 1)
    if input_bdim is None and groups == 1:
        # One group: the samples' filters stack as more output channels of the shared input.
        outputs = op(input, weight, bias, stride, padding, dilation, 1, *pooling)
    else:
        input = _batch_first(input, input_bdim, batch).movedim(0, 1).flatten(1, 2)
        outputs = op(input, weight, bias, stride, padding, dilation, groups * batch, *pooling)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [t.unflatten(1, (batch, out_channels)) for t in outputs], 1


@torch.library.register_vmap("ptfast::conv2d_relu_max_pool2d")
def _conv2d_relu_max_pool2d_vmap(info, in_dims: tuple, *args) -> tuple[Tensor, int]:
    (output,), out_dim = _block_forward_vmap(torch.ops.ptfast.conv2d_relu_max_pool2d, info, in_dims, *args)
    return output, out_dim


@torch.library.register_vmap("ptfast::_conv2d_relu_max_pool2d_with_codes")
def _conv2d_relu_max_pool2d_with_codes_vmap(info, in_dims: tuple, *args) -> tuple[tuple[Tensor, Tensor], tuple]:
    (output, codes), out_dim = _block_forward_vmap(
        torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes, info, in_dims, *args
    )
    return (output, codes), (out_dim, out_dim)


@torch.library.register_vmap("ptfast::_conv2d_relu_max_pool2d_backward")
def _conv2d_relu_max_pool2d_backward_vmap(
    info,
    in_dims: tuple,
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    codes: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    pool_kernel_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    ceil_mode: bool,
    output_mask: list[bool],
) -> tuple[tuple[Optional[Tensor], ...], tuple]:
    op = torch.ops.ptfast._conv2d_relu_max_pool2d_backward
    batch = info.batch_size
    grad_output, input, codes = (
        _batch_first(t, in_dims[i], batch) for i, t in ((0, grad_output), (1, input), (3, codes))
    )
    pooling = (pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask)
    if in_dims[2] is None and not output_mask[1] and not output_mask[2]:
        grad_input, _, _ = op(
            grad_output.flatten(0, 1), input.flatten(0, 1), weight, codes.flatten(0, 1),
            stride, padding, dilation, groups, *pooling,
        )
        return (grad_input.unflatten(0, input.shape[:2]), None, None), (0, None, None)
    # The weight and bias gradients are per sample (the weights may be the same for all).
    weight = _batch_first(weight, in_dims[2], batch)
    grad_input, grad_weight, grad_bias = op(
        grad_output.movedim(0, 1).flatten(1, 2), input.movedim(0, 1).flatten(1, 2), weight.flatten(0, 1),
        codes.movedim(0, 1).flatten(1, 2), stride, padding, dilation, groups * batch, *pooling,
    )
    grads = (
        None if grad_input is None else grad_input.unflatten(1, (batch, input.shape[2])),
        None if grad_weight is None else grad_weight.unflatten(0, weight.shape[:2]),
        None if grad_bias is None else grad_bias.unflatten(0, weight.shape[:2]),
    )
    return grads, tuple(None if g is None else d for g, d in zip(grads, (1, 0, 0)))
