"""Ties, non-positive windows, NaN and inf: ptfast must behave exactly as the native composite."""

from __future__ import annotations

import pytest
import torch

import ptfast
from common_utils import assert_block_matches_native, block_inputs, native_block

INF, NAN = float("inf"), float("nan")

# The whole module runs on both CPU paths of the fused block, direct and vendor.
pytestmark = pytest.mark.usefixtures("conv_block")


def test_all_negative_windows(dtype, device):
    x, w, b = block_inputs(3, 2, 4, 10, 10, 3, 1, True, dtype, device=device)
    with torch.no_grad():
        b.fill_(-1000)
    out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    assert torch.count_nonzero(out) == 0
    assert_block_matches_native(x, w, b, {})
    gx, gw, gb = torch.autograd.grad(ptfast.conv2d_relu_max_pool2d(x, w, b).sum(), (x, w, b))
    assert torch.count_nonzero(gx) == torch.count_nonzero(gw) == torch.count_nonzero(gb) == 0


def test_zero_maximum_gets_no_gradient(dtype):
    """A window whose maximum is exactly 0 is blocked by ReLU, as in native threshold_backward."""
    x = torch.zeros(1, 1, 4, 4, dtype=dtype, requires_grad=True)
    w = torch.ones(1, 1, 1, 1, dtype=dtype, requires_grad=True)
    assert_block_matches_native(x, w, None, {})


@pytest.mark.parametrize("width", [9, 40], ids=["narrow", "wide_rows"])
@pytest.mark.parametrize("kwargs", [{}, dict(pool_kernel_size=3, pool_stride=1, pool_padding=1), dict(padding=1)])
def test_constant_inputs_tie_everywhere(kwargs, width, dtype, device):
    """Every window is a tie: the first maximum in window order gets the gradient."""
    x = torch.full((2, 2, 9, width), 0.5, dtype=dtype, device=device, requires_grad=True)
    w = torch.full((3, 2, 3, 3), 0.25, dtype=dtype, device=device, requires_grad=True)
    b = torch.full((3,), 0.125, dtype=dtype, device=device, requires_grad=True)
    assert_block_matches_native(x, w, b, kwargs)


@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["input", "weight", "bias", "grad_output"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(padding=1), dict(padding=1, stride=2, pool_kernel_size=3, pool_stride=1)],
    ids=["plain", "padded", "strided"],
)
def test_non_finite_values_propagate_like_native(value, where, kwargs, dtype, device, conv_block):
    x, w, b = block_inputs(2, 3, 4, 11, 10, 3, 1, True, dtype, device=device)
    with torch.no_grad():
        if where == "input":
            x[1, 2, 5, 4] = value
            x[0, 0, 0, 9] = value
        elif where == "weight":
            w[2, 1, 1, 0] = value
        elif where == "bias":
            b[1] = value
    # A non-finite weight meets the zero padding. Native float64 (im2col)
    # multiplies it (0 * inf = NaN) while native float32 (oneDNN) skips padded
    # taps; ptfast's direct CPU kernels multiply in both dtypes (README,
    # "Limits"), so they are held to native float64 computed on the same
    # values. The vendor path's convolution is native's own.
    multiplies_padding = device == "cuda" or conv_block == "direct"
    reference_dtype = torch.float64 if where == "weight" and "padding" in kwargs and multiplies_padding else dtype
    x_ref, w_ref, b_ref = (t.detach().to(reference_dtype).requires_grad_() for t in (x, w, b))
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    ref = native_block(x_ref, w_ref, b_ref, **kwargs)
    torch.testing.assert_close(out, ref.to(dtype), equal_nan=True)
    grad = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device)
    if where == "grad_output":
        grad[0, 1, 1, 1] = value
        grad[1, 3, 0, 2] = value
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = [g.to(dtype) for g in torch.autograd.grad(ref, (x_ref, w_ref, b_ref), grad.to(reference_dtype))]
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        assert torch.equal(a.isnan(), e.isnan()), f"NaN pattern of grad {name} differs"
        assert torch.equal(a.isinf(), e.isinf()), f"inf pattern of grad {name} differs"
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("value", [INF, NAN], ids=["inf", "nan"])
def test_non_finite_in_wide_rows(value, dtype):
    """Pooled rows of several vectors: the non-finite values sit in a later chunk."""
    x, w, b = block_inputs(2, 2, 3, 8, 75, 3, 1, True, dtype)
    with torch.no_grad():
        x[0, 1, 3, 60] = value
        x[1, 0, 6, 41] = value
    assert_block_matches_native(x, w, b, {})


def test_non_finite_with_groups(dtype):
    x, w, b = block_inputs(2, 4, 6, 9, 9, 3, 2, True, dtype)
    with torch.no_grad():
        x[0, 3, 4, 4] = NAN
        w[1, 0, 2, 2] = INF
    out, ref = ptfast.conv2d_relu_max_pool2d(x, w, b, groups=2), native_block(x, w, b, groups=2)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for a, e in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
        torch.testing.assert_close(a, e, equal_nan=True)


def _run(x, w, b):
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    return [out, *grads]


def test_deterministic_repeated_calls():
    x, w, b = block_inputs(7, 3, 5, 20, 19, 3, 1, True, torch.float32, seed=5)
    x = (x.detach() + 0.001 * torch.randn_like(x)).requires_grad_()
    first = _run(x, w, b)
    for _ in range(3):
        for a, e in zip(_run(x, w, b), first):
            assert torch.equal(a, e)


def test_same_result_for_any_thread_count(conv_block):
    x, w, b = block_inputs(70, 3, 5, 12, 12, 3, 1, True, torch.float32, seed=6)
    x = (x.detach() + 0.001 * torch.randn_like(x)).requires_grad_()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(x, w, b)
        torch.set_num_threads(max(2, threads))
        multi = _run(x, w, b)
    finally:
        torch.set_num_threads(threads)
    # The vendor path's weight and bias gradients are oneDNN's, whose
    # reduction over the batch depends on the thread count, as in native eager.
    bitwise = 4 if conv_block == "direct" else 2
    for a, e in zip(single[:bitwise], multi[:bitwise]):
        assert torch.equal(a, e)
    for a, e in zip(single[bitwise:], multi[bitwise:]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
