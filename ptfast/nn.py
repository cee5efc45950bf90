"""Modules wrapping ptfast's fused operators, drop-in for their torch.nn counterparts."""

from __future__ import annotations

from torch import Tensor, nn

from ptfast import functional
from ptfast.functional import IntOrPair, _pair

__all__ = ["Conv2dReLUMaxPool2d", "LogSoftmax"]


class Conv2dReLUMaxPool2d(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU and ``nn.MaxPool2d``, computed by one fused op.

    It is an ``nn.Conv2d`` (same ``weight`` and ``bias``, initialised the same
    way from the same random stream), so state dicts load both ways and code
    that walks a model's convolutions sees it. Only zero padding is supported.

    Shapes: input (N, C_in, H, W) or (C_in, H, W); output (N, C_out, H_pool, W_pool)
    or (C_out, H_pool, W_pool).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        pool_kernel_size: IntOrPair = 2,
        pool_stride: IntOrPair | None = None,
        pool_padding: IntOrPair = 0,
        ceil_mode: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.pool_kernel_size = tuple(_pair(pool_kernel_size, "pool_kernel_size"))
        self.pool_stride = (
            self.pool_kernel_size if pool_stride is None else tuple(_pair(pool_stride, "pool_stride"))
        )
        self.pool_padding = tuple(_pair(pool_padding, "pool_padding"))
        self.ceil_mode = ceil_mode

    def forward(self, input: Tensor) -> Tensor:
        return functional.conv2d_relu_max_pool2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.pool_kernel_size,
            self.pool_stride,
            self.pool_padding,
            self.ceil_mode,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pool_kernel_size={self.pool_kernel_size}, "
            f"pool_stride={self.pool_stride}, pool_padding={self.pool_padding}, ceil_mode={self.ceil_mode}"
        )


class LogSoftmax(nn.LogSoftmax):
    """``nn.LogSoftmax(dim)`` computed by ptfast's kernel. Shapes: input (*), output (*)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)

    def forward(self, input: Tensor) -> Tensor:
        return functional.log_softmax(input, self.dim)
