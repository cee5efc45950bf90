"""The log_softmax CUDA kernels' bodies, run on the CPU through their emulated launches, against native.

csrc/ops/cpu/cuda_emulation/log_softmax.cpp runs the very functions the CUDA
kernels call (csrc/ops/cuda/log_softmax_bodies.h), thread by thread and phase
by phase, after the same host rule picked the kernel and launch shape (for an
H100). These tests need no GPU: every index computation, bound and
combine order of the kernels is exercised on every CI machine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ptfast  # noqa: F401  (registers torch.ops.ptfast)

emulated_forward = torch.ops.ptfast._cuda_emulated_log_softmax
emulated_backward = torch.ops.ptfast._cuda_emulated_log_softmax_backward
kernel_for_layout = torch.ops.ptfast._cuda_log_softmax_kernel

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float64", "float32", "bfloat16", "float16"]

# The kernels the host rule can pick (warp_rows with its lanes per row).
ALL_KERNELS = {f"warp_rows/{lanes}" for lanes in (1, 2, 4, 8, 16, 32)} | {
    "block_row_shared", "block_row_streamed", "columns", "columns_split_dim", "none"}


def layout(shape, dim: int) -> tuple[int, int, int]:
    """(outer, dim_size, inner) of a tensor of `shape` reduced along `dim`, as the kernels view it."""
    if len(shape) == 0:
        return 1, 1, 1
    dim %= len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def kernel_for(shape, dim: int, dtype: torch.dtype) -> str:
    return kernel_for_layout(*layout(shape, dim), torch.empty((), dtype=dtype).element_size())


def make_input(shape, dtype: torch.dtype, seed: int = 0, storage_offset: int = 0) -> torch.Tensor:
    """Random data; with storage_offset, a view that many elements into its storage (not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(storage_offset + math.prod(shape), generator=g, dtype=torch.float64) * 3).to(dtype)
    view = flat[storage_offset:].view(shape)
    assert (view.data_ptr() % 16 == 0) == (storage_offset == 0)
    return view


def tolerances(dtype: torch.dtype) -> dict:
    # float32: a long sum's rounding (ours and native's are within 2e-5 of
    # float64 on CASES, native's up to 1.2e-4); the half types: torch.testing's
    # defaults, native's own.
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=5e-5)}.get(dtype, {})


def check_against_native(x: torch.Tensor, dim: int, grad_storage_offset: int = 0):
    """Emulated forward and backward against native, NaN positions included.

    The reference is native in float64, rounded to x's dtype: the kernels compute the half types in
    float32 and round once, as native's CUDA kernels do, whereas native's CPU kernels round
    intermediates to the half type (off by up to 1/32 in bfloat16)."""
    tol = tolerances(x.dtype)
    ref = F.log_softmax(x.double(), dim).to(x.dtype)
    torch.testing.assert_close(emulated_forward(x, dim), ref, equal_nan=True, **tol)
    # The backward of the rounded output, as autograd runs it.
    grad = make_input(x.shape, x.dtype, seed=1, storage_offset=grad_storage_offset)
    want = torch.ops.aten._log_softmax_backward_data(grad.double(), ref.double(), dim, torch.float64)
    torch.testing.assert_close(emulated_backward(grad, ref, dim), want.to(x.dtype), equal_nan=True, **tol)


# One case a kernel, and a case per way through it: the lanes per row of
# warp_rows (a partial last block of rows included), block_row rows in and out
# of shared memory (above 48 KB in every dtype) with 16-byte accesses or scalar
# ones (a row that is not a whole number of 16-byte packs, an input at a
# storage offset), columns with and without dim split (a tile running past
# inner), and grid-stride loops that go round more than once (more rows or
# columns than an H100's resident blocks take at once: 132 x 8 blocks of 256
# threads, 132 x 16 of 128). (shape, dim, storage offset of the input and
# grad_output, the kernel in every dtype).
CASES = {
    "0-d": ((), 0, 0, "warp_rows/1"),
    "empty-rows": ((0, 5), 1, 0, "none"),
    "empty-dim": ((5, 0), 1, 0, "none"),
    "empty-inner": ((2, 0, 3), 0, 0, "none"),
    "warp-rows-1-lane": ((37, 1), 1, 0, "warp_rows/1"),
    "warp-rows-2-lanes": ((300, 2), 1, 0, "warp_rows/2"),
    "warp-rows-4-lanes": ((129, 3), 1, 0, "warp_rows/4"),
    "warp-rows-8-lanes": ((77, 5), 1, 0, "warp_rows/8"),
    "warp-rows-16-lanes": ((40, 16), 1, 0, "warp_rows/16"),
    "warp-rows-32-lanes": ((9, 33), 1, 0, "warp_rows/32"),
    "warp-rows-32-lanes-longest": ((5, 1024), -1, 0, "warp_rows/32"),
    "warp-rows-misaligned": ((33, 7), 1, 1, "warp_rows/8"),
    "warp-rows-grid-stride": ((140000, 2), 1, 0, "warp_rows/2"),
    "block-row-shared-vector": ((3, 1032), 1, 0, "block_row_shared"),
    "block-row-shared-odd-length": ((3, 1031), 1, 0, "block_row_shared"),
    "block-row-shared-misaligned": ((3, 2048), 1, 3, "block_row_shared"),
    "block-row-shared-above-48KB": ((4, 26000), 1, 0, "block_row_shared"),
    "block-row-shared-grid-stride": ((2200, 1030), 1, 0, "block_row_shared"),
    "block-row-streamed-vector": ((4, 120000), 1, 0, "block_row_streamed"),
    "block-row-streamed-odd-length": ((4, 120001), 1, 0, "block_row_streamed"),
    "block-row-streamed-misaligned": ((4, 120000), 1, 5, "block_row_streamed"),
    "columns": ((5, 37), 0, 0, "columns"),
    "columns-3d": ((4, 5, 17), 1, 0, "columns"),
    "columns-misaligned": ((6, 20, 3), 1, 1, "columns"),
    "columns-grid-stride": ((133, 4, 2048), 1, 0, "columns"),
    "columns-split-dim": ((512, 64), 0, 0, "columns_split_dim"),
    "columns-split-dim-few-columns": ((16, 1000, 8), 1, 0, "columns_split_dim"),
    "columns-split-dim-partial-tile": ((3, 200, 37), 1, 0, "columns_split_dim"),
    "columns-split-dim-misaligned": ((2, 300, 5), 1, 1, "columns_split_dim"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cases_cover_every_kernel(dtype):
    assert {name: kernel_for(shape, dim, dtype) for name, (shape, dim, _, _) in CASES.items()} == {
        name: kernel for name, (_, _, _, kernel) in CASES.items()}
    assert {kernel for *_, kernel in CASES.values()} == ALL_KERNELS


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,dim,offset", [case[:3] for case in CASES.values()], ids=CASES.keys())
def test_each_kernel_matches_native(shape, dim, offset, dtype):
    check_against_native(make_input(shape, dtype, storage_offset=offset), dim, grad_storage_offset=offset)


# Special values in four reductions of every kernel: a NaN, a +inf, some -inf,
# and a reduction of -inf only (native: NaN throughout).
SPECIAL_CASES = {name: case for name, case in CASES.items() if math.prod(case[0]) > 0 and
                 math.prod(case[0]) // layout(case[0], case[1])[1] >= 4}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,dim,offset", [case[:3] for case in SPECIAL_CASES.values()], ids=SPECIAL_CASES.keys())
def test_each_kernel_keeps_nan_and_inf(shape, dim, offset, dtype):
    x = make_input(shape, dtype, storage_offset=offset)
    outer, dim_size, inner = layout(shape, dim)
    reduction = lambda x, k: x.view(outer, dim_size, inner)[k // inner, :, k % inner]  # noqa: E731
    reduction(x, 0)[dim_size // 2] = float("nan")
    reduction(x, 1)[0] = float("inf")
    reduction(x, 2)[::2] = -float("inf")
    reduction(x, 3)[:] = -float("inf")
    check_against_native(x, dim, grad_storage_offset=offset)
    out = emulated_forward(x, dim)
    assert reduction(out, 3).isnan().all()
    if dim_size > 1:  # else reduction 2 is -inf only too
        assert (reduction(out, 2)[::2] == -float("inf")).all()


def test_large_magnitudes_are_stable():
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4] * 4])
    for data, dim in [(x, 1), (x.t().contiguous(), 0)]:
        assert torch.isfinite(emulated_forward(data, dim)).all()
        check_against_native(data, dim)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.one_of(st.integers(1, 9), st.integers(10, 3000)), min_size=1, max_size=4)
       .filter(lambda s: math.prod(s) <= 100_000),
       data=st.data(), dtype=st.sampled_from(DTYPES), offset=st.sampled_from([0, 1]))
def test_random_shapes(shape, data, dtype, offset):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_against_native(make_input(shape, dtype, storage_offset=offset), dim, grad_storage_offset=offset)


@pytest.mark.parametrize("layout_,element_size,kernel", [
    ((1, 57856, 1), 4, "block_row_shared"),  # 226 KB + the partials: the largest row in sm_90's 227 KB
    ((1, 57857, 1), 4, "block_row_streamed"),
    ((1, 115712, 1), 2, "block_row_shared"),
    ((1, 28928, 1), 8, "block_row_shared"),
    ((1, 28929, 1), 8, "block_row_streamed"),
    ((1, 1025, 1), 4, "block_row_shared"),
    ((7, 1024, 1), 8, "warp_rows/32"),
    ((1, 524291, 4096), 4, "columns_split_dim"),  # 16 blocks of 524k serial steps before the split
    ((1, 31, 4096), 4, "columns"),  # too short a dim to split
    ((66, 1000, 4096), 4, "columns"),  # 132 x 2048 columns fill an H100 by themselves
    ((1, 100, 270336), 4, "columns"),
    ((2, 100, 2), 4, "columns_split_dim"),
])
def test_kernel_choice(layout_, element_size, kernel):
    assert kernel_for_layout(*layout_, element_size) == kernel


def test_emulated_ops_check_arguments_as_ptfast_log_softmax():
    with pytest.raises(IndexError, match=r"ptfast.log_softmax: `dim` must be in \[-2, 1\] .* got 2"):
        emulated_forward(torch.randn(3, 4), 2)
    with pytest.raises(RuntimeError, match="`grad_output` must have the shape of `output`"):
        emulated_backward(torch.randn(3, 5), torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError, match="`element_size` must be 2, 4 or 8, got 3"):
        kernel_for_layout(1, 2, 3, 3)
