"""Fake (meta) implementations of the ptfast operators.

They compute output shapes and dtypes without running a kernel, which is
what torch.compile traces with and what torch.library.opcheck checks against
the real kernels.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from ptfast._shapes import argmax_code_dtype, pooled_shape


def _memory_format(input, weight):
    """Native conv2d's output and gradient format: channels-last if the input or the weight suggests it."""
    for tensor in (input, weight):
        if suggest_memory_format(tensor) == torch.channels_last:
            return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("ptfast::conv2d_relu_max_pool2d")
def _conv2d_relu_max_pool2d_fake(
    input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode
):
    shape = pooled_shape(input, weight, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input, weight))


@torch.library.register_fake("ptfast::_conv2d_relu_max_pool2d_with_codes")
def _conv2d_relu_max_pool2d_with_codes_fake(
    input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode
):
    shape = pooled_shape(input, weight, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode)
    memory_format = _memory_format(input, weight)
    return (
        torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format),
        torch.empty(shape, dtype=argmax_code_dtype(pool_kernel_size), device=input.device, memory_format=memory_format),
    )


@torch.library.register_fake("ptfast::_conv2d_relu_max_pool2d_backward")
def _conv2d_relu_max_pool2d_backward_fake(
    grad_output,
    input,
    weight,
    codes,
    stride,
    padding,
    dilation,
    groups,
    pool_kernel_size,
    pool_stride,
    pool_padding,
    ceil_mode,
    output_mask,
):
    memory_format = _memory_format(input, weight)
    return (
        torch.empty_like(input, memory_format=memory_format) if output_mask[0] else None,
        torch.empty_like(weight, memory_format=memory_format) if output_mask[1] else None,
        weight.new_empty(weight.shape[0]) if output_mask[2] else None,
    )


# Contiguous whatever the input's strides, as native log_softmax's.
@torch.library.register_fake("ptfast::log_softmax")
def _log_softmax_fake(self, dim):
    return self.new_empty(self.shape)


@torch.library.register_fake("ptfast::_log_softmax_backward")
def _log_softmax_backward_fake(grad_output, output, dim):
    return output.new_empty(output.shape)
