"""Shared helpers: the native reference, test data and comparisons."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ptfast  # noqa: F401  (registers the operators)

# Native float32 convolutions on CUDA may use TF32; the comparisons need full float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA_SKIP)]


def native_block(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode=False):
    """The composite ptfast.conv2d_relu_max_pool2d must reproduce."""
    conv = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return F.max_pool2d(F.relu(conv), pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def make_data(shape, dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random test data.

    float64: standard normal. float32: dyadic values (multiples of 1/8 in
    [-2, 2]) scaled by `scale` (a power of two), so that conv sums are exact in
    float32 whatever the summation order: ptfast and native then agree
    exactly, ties in a pooling window included, and a near-tie can never make
    the two pick different arg-maxes.
    """
    if dtype == torch.float64:
        return torch.randn(shape, dtype=dtype, generator=generator) * scale
    values = torch.randint(-16, 17, shape, generator=generator).to(dtype) / 8
    return values * scale


def block_inputs(
    n: int, c: int, oc: int, h: int, w: int, kernel, groups: int, bias: bool, dtype, seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input, weight, bias) on `device` as leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = make_data((n, c, h, w), dtype, g).to(device).requires_grad_()
    wt = make_data((oc, c // groups, kh, kw), dtype, g, scale=0.25).to(device).requires_grad_()
    b = make_data((oc,), dtype, g).to(device).requires_grad_() if bias else None
    return x, wt, b


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def assert_block_matches_native(x, w, b, kwargs: dict[str, Any], *, check_grad: bool = True, seed: int = 1):
    """Forward and every gradient of ptfast vs the native composite."""
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    ref = native_block(x, w, b, **kwargs)
    tol = tolerances(x.dtype)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)
    if not check_grad:
        return
    g = torch.Generator().manual_seed(seed)
    grad = make_data(ref.shape, x.dtype, g).to(x.device)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m, name=name: f"grad {name}: {m}", **tol)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=["direct", "vendor"], scope="module")
def conv_block(request) -> str:
    """Runs every test of a module on each CPU path of the fused block (ptfast.backends.cpu.conv_block)."""
    with ptfast.backends.cpu.flags(conv_block=request.param):
        yield request.param
