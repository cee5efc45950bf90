"""Output-size rules of the fused op, mirroring csrc/ops/geometry.h.

The fake (meta) implementations use them to give torch.compile and
torch.library.opcheck the shapes the C++ kernels produce; they work on
symbolic sizes too.
"""

from __future__ import annotations

from typing import Sequence

import torch


def conv_output_size(size, kernel: int, stride: int, padding: int, dilation: int):
    """Length of a conv2d output along one axis (may be < 1 if the kernel does not fit)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel: int, stride: int, padding: int, ceil_mode: bool):
    """Length of a max_pool2d output along one axis, with max_pool2d's ceil_mode rule."""
    numerator = size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out = out - 1
    return out


def argmax_code_dtype(pool_kernel_size: Sequence[int]) -> torch.dtype:
    """dtype of the arg-max codes the forward saves: uint8 while they fit."""
    return torch.uint8 if pool_kernel_size[0] * pool_kernel_size[1] < 255 else torch.int32


def pooled_shape(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    pool_padding: Sequence[int],
    ceil_mode: bool,
) -> tuple:
    """(N, C_out, H_pool, W_pool) of the fused op for an (N, C_in, H, W) input."""
    conv = [
        conv_output_size(input.shape[2 + axis], weight.shape[2 + axis], stride[axis], padding[axis], dilation[axis])
        for axis in range(2)
    ]
    torch._check(
        conv[0] > 0 and conv[1] > 0,
        lambda: "ptfast.conv2d_relu_max_pool2d: `weight` kernel is larger than the padded `input`",
    )
    pooled = [
        pool_output_size(conv[axis], pool_kernel_size[axis], pool_stride[axis], pool_padding[axis], ceil_mode)
        for axis in range(2)
    ]
    torch._check(
        pooled[0] > 0 and pooled[1] > 0,
        lambda: "ptfast.conv2d_relu_max_pool2d: `pool_kernel_size` is larger than the conv output",
    )
    return (input.shape[0], weight.shape[0], pooled[0], pooled[1])
