"""Process-wide settings of ptfast's kernels, in the manner of ``torch.backends``.

``ptfast.backends.cpu.conv_block`` picks the implementation of the fused
conv2d -> ReLU -> max_pool2d block on the CPU:

- ``"direct"``: ptfast's own kernels compute the convolution and its gradients;
  fastest where channel counts are small (the MNIST, LeNet and CIFAR blocks).
- ``"vendor"``: ATen's convolution and ``convolution_backward`` (oneDNN)
  compute them, and ptfast runs only the fused epilogue (ReLU, pooling, the
  1-byte arg-max codes) and builds the conv-output gradient from the codes;
  fastest where channel counts are large (AlexNet, VGG).
- ``"auto"`` (the default): a measured rule chooses per call from the shapes,
  for the forward and the backward apart (see README, "Which path serves a block").

Both paths save the same tensors for backward and agree with native PyTorch
as closely as each other. The environment variable ``PTFAST_CPU_CONV_BLOCK``
sets the initial value::

    ptfast.backends.cpu.conv_block = "vendor"
    with ptfast.backends.cpu.flags(conv_block="direct"):
        ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from ptfast import _C
from ptfast.functional import IntOrPair, block_arguments

__all__ = ["cpu"]

ConvBlock = Literal["auto", "direct", "vendor"]

_ENVIRONMENT_VARIABLE = "PTFAST_CPU_CONV_BLOCK"
_PATH_NAMES = {1: "direct", 2: "vendor"}


class _CpuBackend:
    """``ptfast.backends.cpu``: settings of the CPU kernels."""

    @property
    def conv_block(self) -> ConvBlock:
        """Which path serves the fused block on the CPU: 'auto', 'direct' or 'vendor'."""
        return _C._get_cpu_conv_block()

    @conv_block.setter
    def conv_block(self, value: ConvBlock) -> None:
        _C._set_cpu_conv_block(value)

    @contextlib.contextmanager
    def flags(self, conv_block: ConvBlock) -> Iterator[None]:
        """Sets ``conv_block`` inside the ``with`` block and restores it after."""
        previous = self.conv_block
        self.conv_block = conv_block
        try:
            yield
        finally:
            self.conv_block = previous

    def conv_block_path(
        self,
        input: Tensor,
        weight: Tensor,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        pool_kernel_size: IntOrPair = 2,
        pool_stride: IntOrPair | None = None,
        pool_padding: IntOrPair = 0,
        ceil_mode: bool = False,
        backward: bool = False,
    ) -> Literal["direct", "vendor"]:
        """The path a CPU call of ``ptfast.conv2d_relu_max_pool2d`` with these
        arguments takes now: its forward, or with ``backward=True`` its backward.

        Shapes: input (N, C_in, H, W) or (C_in, H, W), weight (C_out, C_in / groups, kH, kW);
        arguments as ptfast.conv2d_relu_max_pool2d takes them. Only the shapes are
        read, so meta tensors do.
        """
        input, arguments = block_arguments(
            input, weight, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode
        )
        path = torch.ops.ptfast._conv2d_relu_max_pool2d_cpu_path(input, weight, *arguments, backward)
        return _PATH_NAMES[path]


cpu = _CpuBackend()

if _ENVIRONMENT_VARIABLE in os.environ:
    try:
        cpu.conv_block = os.environ[_ENVIRONMENT_VARIABLE]
    except ValueError:
        raise ValueError(
            f"ptfast: the environment variable {_ENVIRONMENT_VARIABLE} must be 'auto', 'direct' or "
            f"'vendor', got {os.environ[_ENVIRONMENT_VARIABLE]!r}"
        ) from None
