"""CUDA-only checks: CUDA vs CPU on both paths, half types, autocast, huge tensors, determinism.

The device-parametrised tests of the other files also run on CUDA when a GPU
is visible (on the default, vendor path); here are the checks that only make
sense there. The kernels' bodies and host code run on every machine through
their CPU emulation (tests/test_cuda_emulation_*.py); these tests check what
the emulation cannot: the launches, cuDNN, streams and devices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptfast
from common_utils import block_inputs, native_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

CONFIGS = [
    ((64, 1, 10, 28, 28, 5, 1), {}),
    ((64, 10, 20, 12, 12, 5, 1), {}),
    ((8, 4, 6, 17, 15, (3, 2), 2), dict(groups=2, stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                        pool_kernel_size=(3, 2), pool_stride=(2, 1), pool_padding=(1, 1),
                                        ceil_mode=True)),
    ((4, 3, 5, 13, 13, 3, 1), dict(pool_kernel_size=3, pool_stride=1, padding=1)),
]


def _forward_backward(x, w, b, kwargs):
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    grads = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    return [out, *grads]


@pytest.fixture(params=["direct", "vendor"])
def cuda_path(request) -> str:
    with ptfast.backends.cuda.flags(conv_block=request.param):
        yield request.param


@pytest.mark.parametrize("shape,kwargs", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(shape, kwargs, dtype, cuda_path):
    """Dyadic float32 data: every conv sum is exact, so cuDNN's algorithm and ptfast's order agree."""
    cpu = block_inputs(*shape, True, dtype)
    cuda = [t.detach().cuda().requires_grad_() for t in cpu]
    for a, e in zip(_forward_backward(*cuda, kwargs), _forward_backward(*cpu, kwargs)):
        torch.testing.assert_close(a.cpu(), e)


@pytest.mark.parametrize("shape,kwargs", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_native_on_the_vendor_path(shape, kwargs, dtype):
    """The vendor path pools cuDNN's own half-precision conv output, so it matches native closely;
    the gradients differ only by summation order in cuDNN's convolution_backward."""
    x, w, b = (t.detach().cuda().to(dtype).requires_grad_() for t in block_inputs(*shape, True, torch.float32))
    with ptfast.backends.cuda.flags(conv_block="vendor"):
        ours = _forward_backward(x, w, b, kwargs)
    ref_out = native_block(x, w, b, **kwargs)
    ref = [ref_out, *torch.autograd.grad(ref_out, (x, w, b), torch.ones_like(ref_out))]
    assert torch.equal(ours[0], ref_out)
    for a, e in zip(ours[1:], ref[1:]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_direct_forward_rounds_once(dtype):
    """The direct forward adds the bias in float32 and rounds once, where cuDNN rounds the conv and
    then adds the bias in the half dtype: its values are within one rounding of native's (arg-maxes
    may differ at near-ties, so only the forward is compared)."""
    x, w, b = (t.detach().cuda().to(dtype) for t in block_inputs(8, 3, 16, 20, 20, 3, 1, True, torch.float32))
    with ptfast.backends.cuda.flags(conv_block="direct"):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    reference = native_block(x.double(), w.double(), b.double())
    torch.testing.assert_close(out.double(), reference, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_argument_checks_run_before_the_device_guard():
    """A CPU input with CUDA weights gets the error that names the argument, not a guard error."""
    x, w, b = block_inputs(1, 2, 3, 8, 8, 3, 1, True, torch.float32)
    with pytest.raises(RuntimeError, match="`weight` is on cuda"):
        ptfast.conv2d_relu_max_pool2d(x, w.cuda(), b.cuda())


def test_channels_last_stays_channels_last_on_the_vendor_path():
    x, w, b = (t.detach().cuda() for t in block_inputs(4, 8, 16, 14, 14, 3, 1, True, torch.float32))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    ref = native_block(x, w, b, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)


def test_autocast_runs_block_in_autocast_dtype_and_log_softmax_in_float32():
    x, w, b = (t.detach().cuda() for t in block_inputs(16, 1, 10, 28, 28, 5, 1, True, torch.float32))
    with torch.autocast("cuda", dtype=torch.float16):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
        ref = native_block(x, w, b)
        logp = ptfast.log_softmax(out.flatten(1), dim=1)
        ref_logp = F.log_softmax(ref.flatten(1), dim=1)
    assert out.dtype == ref.dtype == torch.float16
    assert logp.dtype == ref_logp.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logp, ref_logp, rtol=2e-2, atol=2e-2)


def test_autocast_backward_reaches_float32_parameters():
    x, w, b = (t.detach().cuda().requires_grad_() for t in block_inputs(4, 3, 4, 12, 12, 3, 1, True, torch.float32))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


# One shape per CUDA kernel of log_softmax (csrc/ops/cuda/log_softmax_bodies.h;
# tests/test_cuda_emulation_log_softmax.py runs their bodies on the CPU), with
# the kernel the rule picks on sm_90 in float32 and float16; (shape, dim,
# storage offset of the input: 1 for a view that is not 16-byte aligned).
LOG_SOFTMAX_KERNELS = {
    "warp-rows-short": ((64, 10), 1, 0, "warp_rows/16"),
    "warp-rows-many": ((65536, 10), 1, 0, "warp_rows/16"),
    "block-row-shared-above-48KB": ((4096, 32000), 1, 0, "block_row_shared"),
    "block-row-shared-misaligned": ((4096, 32000), 1, 1, "block_row_shared"),
    "block-row-streamed": ((64, 120000), 1, 0, "block_row_streamed"),
    "block-row-streamed-misaligned": ((64, 120001), 1, 1, "block_row_streamed"),
    "columns": ((132, 8, 2048), 1, 0, "columns"),
    "columns-split-dim": ((512, 4096), 0, 0, "columns_split_dim"),
    "columns-split-dim-few-columns": ((16, 100000, 8), 1, 0, "columns_split_dim"),
    "columns-split-dim-misaligned": ((128, 257, 9), 1, 1, "columns_split_dim"),
}


def _log_softmax_input(shape, dim, offset, dtype):
    flat = torch.randn(offset + math.prod(shape), device="cuda", dtype=dtype)
    x = flat[offset:].view(shape)
    outer, inner = math.prod(shape[:dim % len(shape)]), math.prod(shape[dim % len(shape) + 1:])
    return x, (outer, shape[dim], inner)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape,dim,offset,kernel", LOG_SOFTMAX_KERNELS.values(), ids=LOG_SOFTMAX_KERNELS.keys())
def test_log_softmax_cuda_matches_native(shape, dim, offset, kernel, dtype):
    x, layout = _log_softmax_input(shape, dim, offset, dtype)
    assert torch.ops.ptfast._cuda_log_softmax_kernel(*layout, x.element_size()) == kernel
    x.requires_grad_()
    y, r = ptfast.log_softmax(x, dim), F.log_softmax(x, dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, r, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if x.numel() <= 1 << 24:  # the emulation runs one CPU thread: seconds beyond
        # The kernels against their CPU emulation: the same bodies, launch
        # shapes and combine orders; only the GPU's exp and log differ.
        emulated = torch.ops.ptfast._cuda_emulated_log_softmax(x.detach().cpu(), dim)
        torch.testing.assert_close(y.cpu(), emulated, rtol=tol, atol=tol)
    assert torch.equal(ptfast.log_softmax(x, dim), y), "not deterministic"


def test_log_softmax_backward_names_the_argument_on_the_wrong_device():
    # The device guard comes after the argument checks: a CPU grad_output with
    # a CUDA output is reported as such, not as a guard error.
    y = ptfast.log_softmax(torch.randn(3, 4, device="cuda"), 1)
    with pytest.raises(RuntimeError, match="`grad_output` is on cpu but `output` is on cuda"):
        torch.ops.ptfast._log_softmax_backward(torch.randn(3, 4), y, 1)


def test_log_softmax_more_than_2_31_elements():
    rows, length = 2**31 // 4096 + 3, 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * rows * length * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a > 2^31-element half tensor, its output and gradient")
    x = torch.randn(rows, length, device="cuda", dtype=torch.float16)
    y = ptfast.log_softmax(x, 1)
    for row in (0, rows // 2, rows - 1):
        torch.testing.assert_close(y[row], F.log_softmax(x[row], 0), rtol=1e-2, atol=1e-2)
    del y
    grad = ptfast.log_softmax(x, 0)  # non-last dim on the same > 2^31 tensor
    torch.testing.assert_close(grad[:, :8], F.log_softmax(x[:, :8].float(), 0).half(), rtol=1e-2, atol=1e-2)


def test_cuda_deterministic(cuda_path):
    """ptfast's kernels use no atomics; cuDNN's convolution_backward is deterministic when asked, as in native."""
    x, w, b = (t.detach().cuda().requires_grad_() for t in block_inputs(64, 10, 20, 12, 12, 5, 1, True, torch.float32))
    x = (x.detach() + 1e-3 * torch.randn_like(x)).requires_grad_()
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        first = _forward_backward(x, w, b, {})
        for _ in range(3):
            for a, e in zip(_forward_backward(x, w, b, {}), first):
                assert torch.equal(a, e)
