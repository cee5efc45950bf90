"""The CUDA fused block run on the CPU: its kernel bodies and host code against native torch.

The private ops ``_cuda_emulated_conv2d_relu_max_pool2d_*`` run the CUDA
backend's host code (csrc/ops/cuda/conv2d_relu_max_pool2d_host.h) with a launch
that executes the kernel bodies (conv2d_relu_max_pool2d_bodies.h) over every
item on the CPU instead of on a GPU (csrc/ops/cuda/launch.h). Only the launch
and ATen's convolution differ: the CPU's here, cuDNN's on a GPU. Both CUDA
paths, direct and vendor, go through the whole verification grid, so every
index, bound and code convention of the CUDA kernels is checked on every CI
run, GPU or not.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptfast
from common_utils import (
    GRID,
    assert_block_matches_native,
    block_inputs,
    grid_inputs,
    make_data,
    native_block,
)
from ptfast.functional import block_arguments
from strategies import block_configs

INF, NAN = float("inf"), float("nan")
ops = torch.ops.ptfast


@pytest.fixture(params=["direct", "vendor"], scope="module")
def cuda_path(request) -> str:
    """Runs a test on each CUDA path of the fused block (ptfast.backends.cuda.conv_block)."""
    with ptfast.backends.cuda.flags(conv_block=request.param):
        yield request.param


class _EmulatedBlock(torch.autograd.Function):
    """The CUDA backend's forward and backward, emulated, with native autograd around them."""

    @staticmethod
    def forward(ctx, input, weight, bias, arguments):
        output, codes = ops._cuda_emulated_conv2d_relu_max_pool2d_with_codes(input, weight, bias, *arguments)
        ctx.save_for_backward(input, weight, codes)
        ctx.arguments = arguments
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, codes = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = ops._cuda_emulated_conv2d_relu_max_pool2d_backward(grad_output, input, weight, codes,
                                                                   *ctx.arguments, mask)
        return *(g if needed else None for g, needed in zip(grads, mask)), None


def emulated_block(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, pool_kernel_size=2,
                   pool_stride=None, pool_padding=0, ceil_mode=False):
    """ptfast.conv2d_relu_max_pool2d as the CUDA backend computes it, on CPU tensors."""
    batched, arguments = block_arguments(input, weight, stride, padding, dilation, groups, pool_kernel_size,
                                         pool_stride, pool_padding, ceil_mode)
    output = _EmulatedBlock.apply(batched, weight, bias, arguments)
    return output.squeeze(0) if input.dim() == 3 else output


@pytest.mark.parametrize("shape,kwargs", [(s, k) for _, s, k in GRID], ids=[i for i, _, _ in GRID])
def test_grid_matches_native(shape, kwargs, dtype, cuda_path):
    x, w, b = grid_inputs(shape, dtype)
    assert_block_matches_native(x, w, b, {**kwargs, "groups": shape.get("groups", 1)}, block=emulated_block)


def _direct_kernel(shape: dict, kwargs: dict, dtype: torch.dtype = torch.float32) -> str:
    x, w, _ = grid_inputs(shape, dtype)
    batched, arguments = block_arguments(x, w, **{"stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                                  "pool_kernel_size": 2, "pool_stride": None, "pool_padding": 0,
                                                  "ceil_mode": False, **kwargs, "groups": shape.get("groups", 1)})
    return ops._cuda_conv2d_relu_max_pool2d_direct_kernel(batched, w, *arguments)


def test_grid_covers_every_direct_kernel():
    """The tiled kernel's compile-time sizes (2x2/3x3 pooling; 5x5, 3x3 or run-time conv kernels), tiles in
    both directions and partial channel blocks, and the per-output kernel for every other window."""
    covered = {_direct_kernel(shape, kwargs) for _, shape, kwargs in GRID if shape.get("n", 2) > 0}
    expected = {f"tiled pool {p}x{p} kernel {k}x{k}" for p in (2, 3) for k in (5, 3, 0)} | {"per output"}
    assert expected - covered == set()
    # More tiles than one along each axis: MNIST's block 1 (12 x 12 pooled) and the wide rows (3 x 34).
    assert _direct_kernel(dict(n=3, c=1, oc=10, h=28, w=28, kernel=5), {}) == "tiled pool 2x2 kernel 5x5"
    # A staged input larger than 48 KB of shared memory takes the per-output kernel.
    assert _direct_kernel(dict(n=1, c=1, oc=1, h=200, w=200, kernel=1), dict(stride=6, pool_kernel_size=3),
                          torch.float64) == "per output"


@settings(max_examples=60, deadline=None)
@given(config=block_configs(), dtype=st.sampled_from([torch.float64, torch.float32]),
       path=st.sampled_from(["direct", "vendor"]))
def test_random_configurations(config, dtype, path):
    shape, kwargs, seed = config
    x, w, b = grid_inputs(shape, dtype, seed)
    with ptfast.backends.cuda.flags(conv_block=path):
        assert_block_matches_native(x, w, b, kwargs, seed=seed, block=emulated_block)


@pytest.mark.parametrize("kwargs", [{}, dict(pool_kernel_size=3, pool_stride=2, pool_padding=1, ceil_mode=True),
                                    dict(pool_kernel_size=(2, 3))],
                         ids=["pool2", "pool3_overlapping", "pool2x3_per_output"])
def test_codes_are_the_cpu_backends(kwargs, cuda_path):
    """The 1-byte arg-max codes mean the same on every backend: a forward on one may meet a backward on another."""
    x, w, b = block_inputs(3, 4, 6, 15, 14, 3, 1, True, torch.float32)
    arguments = block_arguments(x, w, 1, 1, 1, 1, **{"pool_kernel_size": 2, "pool_stride": None, "pool_padding": 0,
                                                      "ceil_mode": False, **kwargs})[1]
    output, codes = ops._cuda_emulated_conv2d_relu_max_pool2d_with_codes(x, w, b, *arguments)
    expected_output, expected_codes = ops._conv2d_relu_max_pool2d_with_codes(x, w, b, *arguments)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, expected_codes)
    assert torch.equal(output, expected_output)


@pytest.mark.parametrize("which", ["input", "weight", "both"])
def test_channels_last_follows_native(which, dtype, cuda_path):
    """The vendor path reads and writes by strides (items in channels-last order); the direct one copies."""
    x, w, b = block_inputs(2, 5, 7, 12, 11, 3, 1, True, dtype)
    with torch.no_grad():
        if which in ("input", "both"):
            x = x.contiguous(memory_format=torch.channels_last)
        if which in ("weight", "both"):
            w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    out, ref = emulated_block(x, w, b, padding=1), native_block(x, w, b, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    assert_block_matches_native(x, w, b, dict(padding=1), block=emulated_block)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{}, dict(padding=1, pool_kernel_size=3, pool_stride=2)], ids=["plain", "overlap"])
def test_half_precision_matches_native(half, kwargs, cuda_path):
    """Dyadic data: the conv sums are exact in float32, so rounding them once to the half dtype gives
    native's values, ties and arg-maxes included; the gradients accumulate in float32 as native's do."""
    x, w, b = (t.detach().to(half).requires_grad_() for t in block_inputs(2, 3, 8, 13, 12, 3, 1, True, torch.float32))
    out, ref = emulated_block(x, w, b, **kwargs), native_block(x, w, b, **kwargs)
    assert out.dtype == half
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = make_data(ref.shape, torch.float32, torch.Generator().manual_seed(5)).to(half)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        assert a.dtype == half
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad {name}: {m}")


def test_all_negative_windows_send_no_gradient(dtype, cuda_path):
    x, w, b = block_inputs(3, 2, 4, 10, 10, 3, 1, True, dtype)
    with torch.no_grad():
        b.fill_(-1000)
    out = emulated_block(x, w, b)
    assert torch.count_nonzero(out) == 0
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("kwargs", [{}, dict(pool_kernel_size=3, pool_stride=1, pool_padding=1), dict(padding=1)])
def test_constant_inputs_tie_everywhere(kwargs, dtype, cuda_path):
    """Every window is a tie: the first maximum in window order gets the gradient, as in native."""
    x = torch.full((2, 2, 9, 11), 0.5, dtype=dtype, requires_grad=True)
    w = torch.full((3, 2, 3, 3), 0.25, dtype=dtype, requires_grad=True)
    b = torch.full((3,), 0.125, dtype=dtype, requires_grad=True)
    assert_block_matches_native(x, w, b, kwargs, block=emulated_block)


@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["input", "weight", "bias", "grad_output"])
@pytest.mark.parametrize("kwargs", [{}, dict(padding=1, stride=2, pool_kernel_size=3, pool_stride=1)],
                         ids=["plain", "padded_overlapping"])
def test_non_finite_values_propagate_like_native(value, where, kwargs, dtype, cuda_path):
    x, w, b = block_inputs(2, 3, 4, 11, 10, 3, 1, True, dtype)
    with torch.no_grad():
        if where == "input":
            x[1, 2, 5, 4] = value
            x[0, 0, 0, 9] = value
        elif where == "weight":
            w[2, 1, 1, 0] = value
        elif where == "bias":
            b[1] = value
    # The direct kernel multiplies zero padding by the weight (0 * inf = NaN),
    # as native float64 (im2col) and cuDNN do, while native float32 on the CPU
    # (oneDNN) skips padded taps: hold it to native float64 there. The
    # emulated vendor path's convolution is native's own.
    skips_padding = cuda_path == "direct" and where == "weight" and "padding" in kwargs
    reference_dtype = torch.float64 if skips_padding else dtype
    x_ref, w_ref, b_ref = (t.detach().to(reference_dtype).requires_grad_() for t in (x, w, b))
    out = emulated_block(x, w, b, **kwargs)
    ref = native_block(x_ref, w_ref, b_ref, **kwargs)
    torch.testing.assert_close(out, ref.to(dtype), equal_nan=True)
    grad = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    if where == "grad_output":
        grad[0, 1, 1, 1] = value
        grad[1, 3, 0, 2] = value
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = [g.to(dtype) for g in torch.autograd.grad(ref, (x_ref, w_ref, b_ref), grad.to(reference_dtype))]
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        assert torch.equal(a.isnan(), e.isnan()), f"NaN pattern of grad {name} differs"
        assert torch.equal(a.isinf(), e.isinf()), f"inf pattern of grad {name} differs"
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m, name=name: f"grad {name}: {m}")


def test_codes_naming_no_tap_send_their_gradient_nowhere():
    """The conv-gradient kernel compares codes and never indexes by them: a corrupt code from a caller
    of the raw op cannot make it write out of bounds (the CPU backend raises instead)."""
    x, w, b = block_inputs(1, 1, 1, 6, 6, 1, 1, True, torch.float32)
    arguments = block_arguments(x, w, 1, 0, 1, 1, 2, None, 0, False)[1]
    _, codes = ops._cuda_emulated_conv2d_relu_max_pool2d_with_codes(x, w, b, *arguments)
    corrupt = torch.full_like(codes, 200)
    grad_input, _, _ = ops._cuda_emulated_conv2d_relu_max_pool2d_backward(
        torch.ones(codes.shape), x, w, corrupt, *arguments, [True, True, True])
    assert torch.count_nonzero(grad_input) == 0


def test_auto_serves_every_call_with_the_vendor_path():
    x, w = torch.empty(8, 3, 32, 32, device="meta"), torch.empty(16, 3, 5, 5, device="meta")
    cuda = ptfast.backends.cuda
    with cuda.flags(conv_block="auto"):
        assert cuda.conv_block_path(x, w) == cuda.conv_block_path(x, w, backward=True) == "vendor"
    with cuda.flags(conv_block="direct"):
        assert cuda.conv_block_path(x, w) == "direct"
        assert cuda.conv_block_path(x, w, backward=True) == "vendor"  # no direct CUDA backward
        assert ptfast.backends.cpu.conv_block == "auto"  # the CPU setting is its own


def test_environment_variable_sets_the_cuda_policy():
    env = {**os.environ, "PTFAST_CUDA_CONV_BLOCK": "direct"}
    code = "import ptfast; print(ptfast.backends.cuda.conv_block, ptfast.backends.cpu.conv_block)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["direct", "auto"], result.stderr
    env["PTFAST_CUDA_CONV_BLOCK"] = "fastest"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "PTFAST_CUDA_CONV_BLOCK must be 'auto', 'direct' or 'vendor', got 'fastest'" in result.stderr


def test_setting_an_unknown_path_names_the_backend():
    with pytest.raises(ValueError, match=r"ptfast.backends.cuda: `conv_block` must be 'auto', 'direct' or 'vendor'"):
        ptfast.backends.cuda.conv_block = "cudnn"
