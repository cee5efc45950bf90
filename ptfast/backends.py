"""Process-wide settings of ptfast's kernels, in the manner of ``torch.backends``.

``ptfast.backends.cpu.conv_block`` and ``ptfast.backends.cuda.conv_block`` pick
the implementation of the fused conv2d -> ReLU -> max_pool2d block on each
device:

- ``"direct"``: ptfast's own kernels compute the convolution. On the CPU they
  also compute its gradients and are fastest where channel counts are small
  (the MNIST, LeNet and CIFAR blocks). On CUDA only the forward is ptfast's
  (one thread per pooled output); the backward is the vendor one.
- ``"vendor"``: ATen's convolution and ``convolution_backward`` (oneDNN on
  the CPU, cuDNN on CUDA) compute them, and ptfast runs only the fused
  epilogue (ReLU, pooling, the 1-byte arg-max codes) and builds the
  conv-output gradient from the codes; fastest where channel counts are
  large (AlexNet, VGG), and never slower than native by construction.
- ``"auto"`` (the default): on the CPU a measured rule chooses per call from
  the shapes, for the forward and the backward apart; on CUDA the vendor path
  serves every call until a GPU measurement shows where the direct forward
  wins (README, "Which path serves a block").

Both paths save the same tensors for backward and agree with native PyTorch
as closely as each other. The environment variables ``PTFAST_CPU_CONV_BLOCK``
and ``PTFAST_CUDA_CONV_BLOCK`` set the initial values::

    ptfast.backends.cpu.conv_block = "vendor"
    with ptfast.backends.cuda.flags(conv_block="direct"):
        ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

from torch import Tensor

from ptfast import _C
from ptfast.functional import IntOrPair, block_arguments

__all__ = ["cpu", "cuda"]

ConvBlock = Literal["auto", "direct", "vendor"]

class _Backend:
    """``ptfast.backends.cpu`` or ``ptfast.backends.cuda``: settings of one device's kernels."""

    def __init__(self, device: Literal["cpu", "cuda"]) -> None:
        self._device = device
        environment_variable = f"PTFAST_{device.upper()}_CONV_BLOCK"
        if environment_variable in os.environ:
            try:
                self.conv_block = os.environ[environment_variable]  # type: ignore[assignment]
            except ValueError:
                raise ValueError(
                    f"ptfast: the environment variable {environment_variable} must be 'auto', 'direct' or "
                    f"'vendor', got {os.environ[environment_variable]!r}"
                ) from None

    @property
    def conv_block(self) -> ConvBlock:
        """Which path serves the fused block on this device: 'auto', 'direct' or 'vendor'."""
        return _C._get_conv_block(self._device)

    @conv_block.setter
    def conv_block(self, value: ConvBlock) -> None:
        _C._set_conv_block(self._device, value)

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
        """The path a call of ``ptfast.conv2d_relu_max_pool2d`` on this device with
        these arguments takes now: its forward, or with ``backward=True`` its backward.

        Shapes: input (N, C_in, H, W) or (C_in, H, W), weight (C_out, C_in / groups, kH, kW);
        arguments as ptfast.conv2d_relu_max_pool2d takes them. Only the shapes are
        read, so meta tensors do.
        """
        input, arguments = block_arguments(
            input, weight, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, ceil_mode
        )
        return _C._conv_block_path(self._device, input, weight, *arguments, backward)


cpu = _Backend("cpu")
cuda = _Backend("cuda")
