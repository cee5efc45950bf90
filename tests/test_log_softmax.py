"""ptfast.log_softmax against F.log_softmax: forward, backward, edge values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ptfast
from common_utils import tolerances

SHAPES_AND_DIMS = [
    ((7,), 0), ((7,), -1), ((64, 10), 1), ((3, 1000), -1), ((5, 37), 0), ((2, 3, 5), 1),
    ((4, 5, 17), -1), ((4, 5, 17), 0), ((2, 33, 3, 3), 1), ((1, 1), 1), ((3, 1), 1), ((1, 70000), 1),
]


def _check(x: torch.Tensor, dim: int, equal_nan: bool = False):
    if x.dim() and dim % x.dim() == x.dim() - 1 and x.shape[-1] * x.element_size() >= LONG_ROW_BYTES:
        _check_long_rows(x, equal_nan)
        return
    x = x.detach().requires_grad_()
    out, ref = ptfast.log_softmax(x, dim), F.log_softmax(x, dim)
    tol = tolerances(x.dtype)
    torch.testing.assert_close(out, ref, equal_nan=equal_nan, **tol)
    if x.numel() == 0:
        return
    grad = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1)).to(x.device)
    got, = torch.autograd.grad(out, x, grad)
    want, = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got, want, equal_nan=equal_nan, **tol)


# Rows from this size on reduce in parts (csrc/ops/cpu/isa/log_softmax_rows.h, kLongRowBytes).
LONG_ROW_BYTES = 256 << 10


def _check_long_rows(x: torch.Tensor, equal_nan: bool = False):
    """_check for rows of LONG_ROW_BYTES and more along the last dim: the forward against native's,
    the gradient against float64's, within twice native's distance from it (at least 1e-5 for
    float32). The backward sums such a row's grad_output part by part so that threads can share
    the row, and rounds differently from native's single pass: on rows of 70001 float32 both land
    about 1e-4 from float64, each ahead by turns."""
    x = x.detach().requires_grad_()
    out = ptfast.log_softmax(x, -1)
    torch.testing.assert_close(out, F.log_softmax(x, -1), equal_nan=equal_nan, **tolerances(x.dtype))
    grad = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1)).to(x.device)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(F.log_softmax(x64, -1), x64, grad.double())
    (native,) = torch.autograd.grad(F.log_softmax(x, -1), x, grad)
    (ours,) = torch.autograd.grad(out, x, grad)
    finite = exact.isfinite()
    assert torch.equal(ours.isnan(), native.isnan()) if equal_nan else not ours.isnan().any()
    ours_error, native_error = ((g.double() - exact)[finite].abs().max().item() for g in (ours, native))
    floor = 1e-10 if x.dtype == torch.float64 else 1e-5
    assert ours_error <= max(2 * native_error, floor), (ours_error, native_error)


@pytest.mark.parametrize("shape,dim", SHAPES_AND_DIMS, ids=[f"{s}-dim{d}" for s, d in SHAPES_AND_DIMS])
def test_matches_native(shape, dim, dtype, device):
    _check(torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device) * 3, dim)


# One shape per CPU path (csrc/ops/cpu/isa/log_softmax_isa.cpp): rows of one
# element; rows shorter than a vector (the backward's scalar sums, 256 rows a
# block); rows shorter than two vectors reduced across a block (16 rows a
# block on AVX-512 float32, a partial last block); longer rows along their length;
# rows of 256 KiB and more, maximum and sum in one read, chunk by chunk; a non-last
# dim with fewer inner positions than a vector, transposed to rows by copies
# (inner < 4) or register transposes, in chunks of slices or a slice larger
# than a chunk, or (short dims) reduced along dim through spread maxima and
# sums, one chunk or several; and vectors of inner positions.
PATHS = {
    "rows-of-one": ((37, 1), 1),
    "rows-shorter-than-a-vector": ((300, 3), 1),
    "rows-across": ((37, 10), 1),
    "rows-across-full-blocks": ((32, 31), 1),
    "rows-along": ((9, 40), 1),
    "rows-long-one-read": ((3, 70001), 1),
    "transposed-copies": ((7, 10, 2), 1),
    "transposed-registers": ((17, 40, 15), 1),
    "along-dim-spread": ((17, 10, 15), 1),
    "along-dim-spread-chunks": ((700, 5, 7), 1),
    "transposed-large-slice": ((2, 5000, 3), 1),
    "inner-vectors": ((3, 7, 40), 1),
}


@pytest.mark.parametrize("shape,dim", PATHS.values(), ids=PATHS.keys())
def test_each_path_matches_native(shape, dim, dtype, device):
    _check(torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device) * 3, dim)


@pytest.mark.parametrize("shape,dim", PATHS.values(), ids=PATHS.keys())
def test_each_path_keeps_nan_and_inf(shape, dim, dtype, device):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    flat = x.view(-1)
    flat[0], flat[3], flat[-1] = float("nan"), float("inf"), -float("inf")
    x.movedim(dim, -1)[(-1,) * (x.dim() - 1)] = -float("inf")  # a whole reduction of -inf: NaN
    torch.testing.assert_close(ptfast.log_softmax(x, dim), F.log_softmax(x, dim), equal_nan=True)
    _check(x, dim, equal_nan=True)


@pytest.mark.parametrize("shape", [(17, 1000, 15), (2, 100000, 2), (64, 1000, 4), (4, 300001)], ids=str)
def test_long_reductions_at_least_as_accurate_as_native(shape):
    # Along a non-last dim native sums one element after another; ptfast's
    # transposed rows sum in vector lanes, and rows of 256 KiB and more rescale
    # their partial sums as the maximum rises: a different rounding, so
    # compare both with float64 instead of with each other.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    grad = torch.randn(shape, generator=g)
    x64 = x.detach().double().requires_grad_()
    exact = F.log_softmax(x64, 1)
    exact_grad, = torch.autograd.grad(exact, x64, grad.double())
    for function in (ptfast.log_softmax, F.log_softmax):
        out = function(x, 1)
        got, = torch.autograd.grad(out, x, grad)
        errors = [(out.double() - exact).abs().max().item(), (got.double() - exact_grad).abs().max().item()]
        if function is ptfast.log_softmax:
            ours = errors
        else:
            native = errors
    assert ours[0] <= max(native[0], 1e-6) and ours[1] <= max(native[1], 1e-5), (ours, native)


def test_long_rows_chunk_by_chunk(dtype):
    # Rows of 256 KiB and more take their maximum and sum chunk by chunk
    # (2048 elements), rescaling the sum when a chunk raises the maximum.
    # Rows: -inf for the first chunks, then values; a maximum that rises in
    # every chunk; -inf except in the last, partial vector; one whole chunk
    # of NaN past finite chunks; plain values.
    n = 70001
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, n, dtype=dtype, generator=g) * 3
    x[0, :5000] = -float("inf")
    x[1] = torch.linspace(-40, 40, n, dtype=dtype) + x[1] * 0.01
    x[2, :-1] = -float("inf")
    x[3, 4096:6144] = float("nan")
    assert x[0].nbytes >= 256 << 10
    out = ptfast.log_softmax(x, 1)
    assert out[0, :5000].eq(-float("inf")).all() and out[0, 5000:].isfinite().all()
    assert out[2, -1] == 0 and out[3].isnan().all()
    _check(x, 1, equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 300001), (3, 140000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_long_rows_same_on_any_thread_count(shape, dtype):
    # Rows of 256 KiB and more reduce parts of 2**16 elements and combine them
    # in order, whether one thread takes a row or, with fewer rows than
    # threads, several share it: bitwise the same results on 1 to 3 threads
    # (bfloat16 too, on its own data).
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[0, 70000:75000] = -float("inf")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ptfast.log_softmax(x, 1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)
    # Gradients of such rows: test_long_reductions_at_least_as_accurate_as_native.
    ulp = 2.0**-7  # bfloat16's, of the largest |x| (see test_half_precision.py)
    tol = tolerances(dtype) if dtype != torch.bfloat16 else {"rtol": ulp, "atol": ulp * x.float().abs().max().item()}
    torch.testing.assert_close(outs[0], F.log_softmax(x, 1), **tol)


@pytest.mark.parametrize("shape", [(1, 300001), (3, 140000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_long_rows_backward_same_on_any_thread_count(shape, dtype):
    # The backward of rows of 256 KiB and more sums grad_output over the same
    # parts, in order, whether one thread takes a row or, with fewer rows than
    # threads, several share its sum and its grad_input: bitwise the same
    # gradients on 1 to 3 threads, at least as close to float64's as native's
    # (the sums round differently).
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    dy = (torch.randn(shape, generator=g) + 0.01).to(dtype)
    y = ptfast.log_softmax(x, 1)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            (grad,) = torch.autograd.grad(y, x, dy, retain_graph=True)
            grads.append(grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grad, grads[0]) for grad in grads)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(F.log_softmax(x64, 1), x64, dy.double())
    (native,) = torch.autograd.grad(F.log_softmax(x, 1), x, dy)
    ours_error, native_error = ((grad.double() - exact).abs().max().item() for grad in (grads[0], native))
    floor = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-8}[dtype]
    assert ours_error <= max(native_error, floor), (ours_error, native_error)


def test_non_contiguous(dtype):
    x = torch.randn(6, 40, dtype=dtype).t()
    assert not x.is_contiguous()
    _check(x, 1)
    _check(x, 0)


def test_zero_dim_tensor(dtype):
    _check(torch.tensor(3.0, dtype=dtype), 0)
    _check(torch.tensor(3.0, dtype=dtype), -1)


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_shapes(shape, data, dtype):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    _check(torch.randn(shape, dtype=dtype) * 10, dim)


STREAMED = [((6300, 1001), 1), ((100, 65536), 1), ((3, 21, 100003), 1), ((40, 70001), 1)]


@pytest.mark.parametrize("shape,dim", STREAMED, ids=["rows-misaligned", "rows-aligned", "inner-dim", "long-rows"])
def test_outputs_written_with_streaming_stores(shape, dim, dtype):
    # From 24 MiB the CPU backward writes around the caches, and from 8 MiB
    # the forward of rows of 256 KiB or more: the vector-aligned parts
    # streamed, each row's unaligned ends stored normally.
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3
    assert x.nbytes >= 8 << 20
    _check(x, dim)


def test_large_magnitudes_are_stable(dtype, device):
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4, -1e4]], dtype=dtype, device=device)
    out = ptfast.log_softmax(x, 1)
    assert torch.isfinite(out).all()
    _check(x, 1)
    _check(x, 0)


def test_minus_inf_entries(dtype, device):
    x = torch.tensor([[0.0, -float("inf"), 1.0], [-float("inf")] * 3, [float("inf"), 0.0, 1.0]], dtype=dtype,
                     device=device)
    out, ref = ptfast.log_softmax(x, 1), F.log_softmax(x, 1)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out[0, 1] == -float("inf")
    _check(x[:1], 1)


def test_nan_propagates(dtype, device):
    x = torch.randn(4, 6, dtype=dtype, device=device)
    x[1, 2] = float("nan")
    _check(x, 1, equal_nan=True)
    _check(x, 0, equal_nan=True)


@pytest.mark.parametrize("shape,dim", [((0, 5), 1), ((5, 0), 1), ((5, 0), 0), ((0,), 0), ((2, 0, 3), -1)])
def test_empty_tensors(shape, dim, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
    out = ptfast.log_softmax(x, dim)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_dtype_argument():
    x = torch.randn(4, 10)
    out = ptfast.log_softmax(x, 1, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.log_softmax(x, 1, dtype=torch.float64))


def test_gradcheck():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ptfast.log_softmax(t, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: ptfast.log_softmax(t, 0), (x,))


@pytest.mark.parametrize("shape,dim", [((4, 10), 1), ((3, 4, 5), 1), ((6,), 0)])
def test_opcheck(shape, dim, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.ptfast.log_softmax.default, (x, dim))
    y = ptfast.log_softmax(x.detach(), dim)
    torch.library.opcheck(torch.ops.ptfast._log_softmax_backward.default, (torch.randn_like(y), y, dim))


def test_double_backward_raises():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad((ptfast.log_softmax(x, 1) * torch.randn(3, 4, dtype=torch.float64)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="_log_softmax_backward.*not implemented"):
        gx.sum().backward()


def test_deterministic():
    x = torch.randn(513, 1001, requires_grad=True)
    outs = [ptfast.log_softmax(x, 1) for _ in range(3)]
    grads = [torch.autograd.grad(o, x, torch.ones_like(o))[0] for o in outs]
    assert all(torch.equal(o, outs[0]) for o in outs) and all(torch.equal(g, grads[0]) for g in grads)
