"""One small call of every CUDA kernel of ptfast, forward and backward, each dtype.

Run under compute-sanitizer by benchmarks/gpu_check.sh: small enough to finish
quickly under memcheck and racecheck, and covering every launch path (both
block paths, both arg-max code types, channels-last, every log_softmax layout).
"""

from __future__ import annotations

import torch

import ptfast


def block_calls(dtype: torch.dtype) -> None:
    for path in ("vendor", "direct"):
        with ptfast.backends.cuda.flags(conv_block=path):
            _block_calls_on_the_current_path(dtype)


def _block_calls_on_the_current_path(dtype: torch.dtype) -> None:
    for shape, kwargs in [
        ((3, 2, 11, 10), dict(padding=1)),
        ((2, 4, 9, 9), dict(groups=2, stride=2, pool_kernel_size=3, pool_stride=1, ceil_mode=True)),
        ((1, 1, 20, 20), dict(pool_kernel_size=16)),  # int32 arg-max codes
    ]:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(4, shape[1] // kwargs.get("groups", 1), 3, 3, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(4, device="cuda", dtype=dtype, requires_grad=True)
        ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs).sum().backward()
    # channels-last: the vendor path's kernels walk it in its own memory order
    x = torch.randn(2, 3, 9, 8, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    ptfast.conv2d_relu_max_pool2d(x.requires_grad_(), w, None, padding=1).sum().backward()


def log_softmax_calls(dtype: torch.dtype) -> None:
    # warp_rows, block_row_shared, block_row_streamed (a 280 KB float32 row), columns_split_dim, columns
    for shape, dim in [((37, 10), 1), ((5, 3000), 1), ((2, 70000), 1), ((4, 33, 5), 1), ((256, 8, 2048), 1)]:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        ptfast.log_softmax(x, dim).sum().backward()


if __name__ == "__main__":
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        block_calls(dtype)
        log_softmax_calls(dtype)
    torch.cuda.synchronize()
    print("all kernels called")
