"""bfloat16 and float16 on the CPU: both ops against native in the same dtype, and CPU autocast.

Tolerances. Native and ptfast both compute half-precision calls in float32
and round each result once to the half-precision dtype.

* The fused block's grid uses dyadic data (common_utils.make_data): every conv
  sum, gradient sum and pooled value is exact in float32 whatever the order,
  so both sides round the same exact values and must agree bit for bit, ties
  in a pooling window and arg-max choices included.
* log_softmax computes exp and log, never exact, and native's last-dim
  kernel rounds max + log(sum) to the half dtype before subtracting it:
  results may differ by one ulp of the dtype (2**-7 bfloat16, 2**-10
  float16) of the row's largest |x|, and ptfast must be at least as close to
  the float64 result as native is.
* A model on random data under autocast: conv sums are not exact, so a conv
  output near a rounding boundary can round one ulp apart on the two sides,
  and a near-tie in a pooling window can then pick another arg-max. Outputs
  and gradients are compared at a few ulps of the dtype relative to their
  largest entry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptfast
from common_utils import GRID, block_inputs, grid_inputs, make_data, native_block
from tutorial import Net

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bfloat16", "float16"]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(params=HALF, ids=HALF_IDS)
def half(request) -> torch.dtype:
    return request.param


def _assert_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, name
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- the fused block


@pytest.mark.parametrize("path", ["direct", "vendor"])
@pytest.mark.parametrize("shape,kwargs", [(s, k) for _, s, k in GRID], ids=[i for i, _, _ in GRID])
def test_block_matches_native_exactly(shape, kwargs, half, path):
    x, w, b = grid_inputs(shape, torch.float32)
    x, w = (t.detach().to(half).requires_grad_() for t in (x, w))
    b = b.detach().to(half).requires_grad_() if b is not None else None
    kwargs = {**kwargs, "groups": shape.get("groups", 1)}
    with ptfast.backends.cpu.flags(conv_block=path):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
        ref = native_block(x, w, b, **kwargs)
        _assert_equal(out, ref, "output")
        grad = make_data(ref.shape, torch.float32, torch.Generator().manual_seed(1)).to(half)
        leaves = [t for t in (x, w, b) if t is not None]
        got = torch.autograd.grad(out, leaves, grad)
        want = torch.autograd.grad(ref, leaves, grad)
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        _assert_equal(a, e, f"grad {name}")


@pytest.mark.parametrize("shape,kwargs", [(s, k) for _, s, k in GRID], ids=[i for i, _, _ in GRID])
def test_block_inference_matches_native_exactly(shape, kwargs, half):
    # Without gradients the direct kernel keeps the conv sums in float32 and
    # rounds only the pooled values; the bits must still be native's.
    x, w, b = (t.detach().to(half) if t is not None else None for t in grid_inputs(shape, torch.float32))
    kwargs = {**kwargs, "groups": shape.get("groups", 1)}
    with ptfast.backends.cpu.flags(conv_block="direct"), torch.no_grad():
        out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    _assert_equal(out, native_block(x, w, b, **kwargs), "output")


def test_direct_path_rounds_conv_outputs_before_pooling(half):
    # Distinct float32 conv outputs 1 + k * ulp / 8 (k = 0..3) that all round
    # to 1: the direct kernel computes them in float32, and must round them
    # before picking the arg-max, as native's half-precision conv2d stores
    # them (unrounded, the last tap would win).
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = 1
    x[0, 1] = torch.tensor([[0.0, 1.0], [2.0, 3.0]]) * 2.0**-6
    w = torch.tensor([1.0, ULP[half] / 8 * 2.0**6]).view(1, 2, 1, 1)
    xh, wh = x.to(half), w.to(half)
    with ptfast.backends.cpu.flags(conv_block="direct"):
        xh.requires_grad_()
        out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(
            xh, wh, None, [1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    ref = native_block(xh.detach(), wh)
    _assert_equal(out, ref, "output")
    assert codes.flatten().tolist() == [1]  # the first tap, as native's max_pool2d on the rounded values


# The smallest positive value of each dtype.
SMALLEST = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def _rounding_case(case: str, half: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input, weight (both exact in `half`, as float32) and pooling window of a rounding test."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(-127, 128, (2, 3, 10, 10), generator=generator).float()
    w = torch.randint(-8, 9, (4, 3, 3, 3), generator=generator).float() * 2.0**-8
    if case == "subnormal sums":
        return x * SMALLEST[half], w, 2
    if case == "inf and nan":
        x[0, 0, 2, 3] = float("inf")
        x[1, 2, 5, 5] = float("nan")
        x[1, 1, 7, 1] = -float("inf")
        return x, w, 2
    if half == torch.float16:  # sums of up to ~9e5 in float32, past float16's 65504
        return x * 32, w * 2.0**8, 2
    # bfloat16's largest finite value plus an eighth, a half (a tie: rounds to
    # even, which is inf) and one of its last place, and zero; float32 holds them all.
    largest = torch.finfo(torch.bfloat16).max
    x = torch.tensor([[[[largest] * 4], [[2.0**117, 2.0**119, 2.0**120, 0.0]]]])
    return x, torch.ones(1, 2, 1, 1), 1


@pytest.mark.parametrize("with_grad", [True, False], ids=["with_grad", "inference"])
@pytest.mark.parametrize("case", ["subnormal sums", "overflowing sums", "inf and nan"])
def test_direct_path_rounds_like_a_store_in_the_dtype(half, case, with_grad):
    # The direct kernel rounds its float32 conv sums to the dtype in registers
    # (with gradients), or only the pooled values (inference). Sums of
    # products of small integers times powers of two are exact in float32, so
    # the reference is native's float32 block with the conv output stored in
    # the dtype: subnormal sums with bits below the dtype's smallest value
    # (ties to even included), sums past its largest finite value, and inf and
    # NaN inputs.
    x, w, pool = _rounding_case(case, half)
    xh, wh = x.to(half), w.to(half)
    _assert_equal(xh.float(), x, "input exact in the dtype")
    _assert_equal(wh.float(), w, "weight exact in the dtype")

    xf = x.clone().requires_grad_()
    ref = F.max_pool2d(F.relu(F.conv2d(xf, w).to(half)), pool)
    with ptfast.backends.cpu.flags(conv_block="direct"):
        xh.requires_grad_(with_grad)
        out = ptfast.conv2d_relu_max_pool2d(xh, wh, pool_kernel_size=pool)
    _assert_equal(out, ref, "output")
    if case == "overflowing sums":
        assert out.isinf().any() and out.isfinite().any()
    if not with_grad:
        return
    grad = torch.ones_like(ref)
    # Which conv output each window's gradient reaches is the arg-max choice.
    (want,) = torch.autograd.grad(ref, xf, grad)
    (got,) = torch.autograd.grad(out, xh, grad)
    _assert_equal(got, want.to(half), "grad input")


def test_block_autocast_follows_natives_dtypes(half):
    x, w, b = (t.detach() for t in block_inputs(2, 3, 4, 10, 9, 3, 1, True, torch.float32))
    with torch.autocast("cpu", dtype=half):
        for args in [(x, w, b), (x.to(half), w, b), (x.double(), w.double(), b.double())]:
            assert ptfast.conv2d_relu_max_pool2d(*args).dtype == native_block(*args).dtype
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    assert out.dtype == half
    _assert_equal(out, native_block(x.to(half), w.to(half), b.to(half)), "output")


def _cpu_has_bfloat16_dot_products() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags


# (id, (batch, in channels, out channels, size, kernel), op keyword arguments, dtype,
#  the paths auto takes (forward, backward) on a CPU with bfloat16 dot products)
HALF_RULE = [
    ("mnist_block1_n64", (64, 1, 10, 28, 5), {}, torch.bfloat16, ("direct", "direct")),
    ("mnist_block2_n64", (64, 10, 20, 12, 5), {}, torch.bfloat16, ("vendor", "direct")),
    ("mnist_block2_n256", (256, 10, 20, 12, 5), {}, torch.bfloat16, ("vendor", "direct")),
    ("mnist_block2_n32", (32, 10, 20, 12, 5), {}, torch.bfloat16, ("direct", "direct")),
    ("products_127", (4096, 127, 8, 8, 1), {}, torch.bfloat16, ("direct", "direct")),
    ("products_128", (4096, 128, 8, 8, 1), {}, torch.bfloat16, ("vendor", "direct")),
    ("products_256", (4096, 256, 8, 8, 1), {}, torch.bfloat16, ("vendor", "vendor")),
    ("products_256_little_work", (2, 256, 8, 8, 1), {}, torch.bfloat16, ("direct", "direct")),
    ("overlapping", (2, 3, 8, 20, 3), dict(pool_kernel_size=3, pool_stride=2), torch.bfloat16, ("direct", "vendor")),
    ("float16_mnist_block2", (64, 10, 20, 12, 5), {}, torch.float16, ("direct", "direct")),
    ("float16_vgg", (2, 512, 512, 14, 3), dict(padding=1), torch.float16, ("vendor", "direct")),
]


def _auto_paths(dims: tuple[int, ...], kwargs: dict, dtype: torch.dtype) -> tuple[str, str]:
    """The paths auto takes (forward, backward) for (batch, in channels, out channels, size, kernel),
    or the float32 rule's for bfloat16 on a CPU without bfloat16 dot products."""
    n, c, oc, h, k = dims
    x, w = torch.empty(n, c, h, h, device="meta", dtype=dtype), torch.empty(oc, c, k, k, device="meta", dtype=dtype)
    if dtype == torch.bfloat16 and not _cpu_has_bfloat16_dot_products():
        x, w = x.float(), w.float()
    return (ptfast.backends.cpu.conv_block_path(x, w, **kwargs),
            ptfast.backends.cpu.conv_block_path(x, w, backward=True, **kwargs))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dims,kwargs,dtype,expected", [r[1:] for r in HALF_RULE], ids=[r[0] for r in HALF_RULE])
def test_auto_rule_for_half_precision(dims, kwargs, dtype, expected, one_thread):
    """bfloat16 on a CPU with bfloat16 dot products: vendor from 128 products per conv output
    forward with 2**23 multiply-adds per thread (in AMX tiles of 16 output channels), 256
    backward with 2**24, else the float32 rule; float16: direct for every backward."""
    got = _auto_paths(dims, kwargs, dtype)
    if dtype == torch.bfloat16 and not _cpu_has_bfloat16_dot_products():
        assert got == _auto_paths(dims, kwargs, torch.float32)
    else:
        assert got == expected


@pytest.mark.skipif(not _cpu_has_bfloat16_dot_products(), reason="the rule for CPUs with bfloat16 dot products")
def test_bfloat16_forward_rule_counts_tile_work_per_thread(one_thread):
    # 40 x 64 x 250 x 20 = 2**23.6 multiply-adds: 20 output channels fill 20 of
    # 32 tile lanes (2**22.9 counted), 32 fill all of theirs.
    assert _auto_paths((40, 10, 20, 12, 5), {}, torch.bfloat16)[0] == "direct"
    assert _auto_paths((40, 10, 32, 12, 5), {}, torch.bfloat16)[0] == "vendor"
    # MNIST block 2 N64 (2**23.6 counted): oneDNN's on one thread, the direct
    # kernels' on two (2**22.6 per thread).
    assert _auto_paths((64, 10, 20, 12, 5), {}, torch.bfloat16)[0] == "vendor"
    torch.set_num_threads(2)
    assert _auto_paths((64, 10, 20, 12, 5), {}, torch.bfloat16)[0] == "direct"


# ----------------------------------------------------------------------------- log_softmax

# One shape per CPU path (see tests/test_log_softmax.py), and the slices
# larger than a float32 chunk. Half precision runs the row kernels on its own
# data along the last dim (rows of more than 31 elements forward, every
# backward), and elsewhere goes through float32 buffers of 2**14 elements, or
# through the whole tensor beyond that.
LOG_SOFTMAX_SHAPES = {
    "mnist-logits": ((64, 10), 1),
    "rows-of-one": ((37, 1), 1),
    "rows-across": ((37, 10), 1),
    "rows-across-backward-along": ((37, 20), 1),
    "rows-along": ((9, 40), 1),
    "rows-long": ((3, 70000), 1),
    "rows-long-one-read": ((2, 140000), 1),
    "rows-prefetched": ((40, 60000), 1),
    "many-chunks": ((300, 1000), 1),
    "transposed-copies": ((7, 10, 2), 1),
    "transposed-registers": ((17, 10, 15), 1),
    "transposed-large-slice": ((2, 5000, 5), 1),
    "inner-vectors": ((3, 7, 40), 1),
    "inner-vectors-large-slice": ((2, 300, 100), 1),
    "first-dim": ((5, 37), 0),
    "zero-dim": ((), 0),
}


@pytest.mark.parametrize("shape,dim", LOG_SOFTMAX_SHAPES.values(), ids=LOG_SOFTMAX_SHAPES.keys())
def test_log_softmax_matches_native(shape, dim, half):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(half).requires_grad_()
    out, ref = ptfast.log_softmax(x, dim), F.log_softmax(x, dim)
    assert out.dtype == half
    # Native's last-dim kernel stores max + log(sum) in the half dtype before
    # subtracting it, so its results can sit one ulp of that offset (of the
    # row's largest |x|) away from ptfast's, which round once from float32;
    # ptfast is never the less accurate of the two.
    exact = F.log_softmax(x.double(), dim)
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max()
    scale = max(1.0, x.detach().abs().max().item())
    torch.testing.assert_close(out, ref, rtol=ULP[half], atol=ULP[half] * scale)
    grad = torch.randn(shape, generator=g).to(half)
    got, = torch.autograd.grad(out, x, grad)
    want, = torch.autograd.grad(ref, x, grad)
    # dx = dy - exp(y) * sum(dy): native stores sum(dy) in the half dtype,
    # ptfast keeps it in float32 and rounds dx once, so they may differ by
    # one ulp of sum(dy); ptfast again is at least as accurate.
    y = out.detach().double()
    exact = grad.double() - y.exp() * grad.double().sum(dim, keepdim=True)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max()
    sums = grad.float().sum(dim).abs().max().item()
    torch.testing.assert_close(got, want, rtol=ULP[half], atol=ULP[half] * max(1.0, sums))


# Backward layouts whose grad_input is rounded from float32 by each
# conversion: the row kernels' stores (rows of at least a vector, and
# shorter ones), and the float32 buffers of the other layouts.
ROUNDING_LAYOUTS = {"rows": (6, 37, 1), "short-rows": (6, 10, 1), "small-inner": (6, 37, 3)}


@pytest.mark.parametrize("layout", ROUNDING_LAYOUTS.values(), ids=ROUNDING_LAYOUTS.keys())
def test_log_softmax_backward_rounds_as_torch_converts(layout, half):
    # dx = dy - exp(y) * sum(dy) with y in {0, -inf}: exp(y) is exactly 1 or
    # 0, so dx is dy itself (denormals, which VCVTNEPS2BF16 would flush to
    # zero, signed zeros) or, where y = 0, minus the sum of the slice's other
    # dy: a float32 value to round. Every sum is exact, so torch's float32
    # reference is the same value, and the halves must be the bits torch's
    # own .to(dtype) gives (bfloat16 NaN included).
    outer, dim_size, inner = layout
    tiny = torch.finfo(half).smallest_normal
    big = torch.finfo(half).max
    ulp = ULP[half]
    passed = torch.tensor([tiny / 2, -tiny / 4, tiny / 64, 3.0, -0.0, -1.5, 2.0**-20] * dim_size)[:dim_size]
    dy = torch.empty(outer, dim_size, inner)
    for o in range(outer):
        for j in range(inner):
            dy[o, :, j] = passed * (-1) ** (o + j)
    y = torch.full_like(dy, float("-inf"))
    # Slices 0-3 at inner position 0, where y = 0 at d = 0: a tie rounded
    # down to even, one rounded up to even, one past the tie, and an overflow
    # to -inf.
    others = [[1.0, ulp / 2], [1.0, 3 * ulp / 2], [1.0, ulp / 2, ulp * ulp], [big, big * ulp / 2]]
    for o, values in enumerate(others):
        dy[o, :, 0] = 0
        dy[o, 1 : 1 + len(values), 0] = torch.tensor(values)
        y[o, 0, 0] = 0
    if inner > 1:
        dy[0, 0, 1] = float("nan")  # the slice's sum and every dx: NaN
        dy[1, 2, 2] = float("inf")  # sum inf, dx = dy - 0 * inf: NaN
    dy, y = dy.to(half), y.to(half)
    got = torch.ops.ptfast._log_softmax_backward(dy.squeeze(-1), y.squeeze(-1), 1).view(outer, dim_size, inner)
    want = (dy.float() - y.float().exp() * dy.float().sum(1, keepdim=True)).to(half)
    assert got[:4, 0, 0].tolist() == [-1.0, -(1 + 2 * ulp), -(1 + ulp), float("-inf")]
    denormals = got[4:, 7:10, 0].abs()  # passed[0:3]
    assert ((denormals > 0) & (denormals < tiny)).all()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.view(torch.int16)[~got.isnan()], want.view(torch.int16)[~want.isnan()])
    if half == torch.bfloat16:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_log_softmax_edge_values(half):
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("nan"), 0.0, 1.0], [float("-inf")] * 3]).to(half)
    torch.testing.assert_close(ptfast.log_softmax(x, 1), F.log_softmax(x, 1), equal_nan=True)


def test_log_softmax_autocast_follows_natives_dtypes(half):
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=half):
        for t in (x, x.to(half), x.double()):
            out = ptfast.log_softmax(t, 1)
            assert out.dtype == F.log_softmax(t, 1).dtype == t.dtype


# ----------------------------------------------------------------------------- the tutorial's model


def _autocast_run(model: torch.nn.Module, x: torch.Tensor, half: torch.dtype):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=half):
        out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.dtype)
    out.backward(g)
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_cls", [Net, ptfast.models.MnistCNN], ids=["tutorial-Net", "MnistCNN"])
def test_fused_model_under_autocast_matches_native(model_cls, half):
    torch.manual_seed(0)
    native = model_cls().eval()
    fused = ptfast.fuse(native)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out_n, gx_n, grads_n = _autocast_run(native, x, half)
    out_f, gx_f, grads_f = _autocast_run(fused, x, half)
    assert out_f.dtype == out_n.dtype == half
    assert gx_f.dtype == gx_n.dtype == torch.float32

    def close(a, e, name):
        scale = max(1e-3, e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=4 * ULP[half], atol=4 * ULP[half] * scale, msg=lambda m: f"{name}: {m}")

    close(out_f, out_n, "output")
    close(gx_f, gx_n, "grad input")
    assert list(grads_f) == list(grads_n)
    for name in grads_n:
        assert grads_f[name].dtype == grads_n[name].dtype == torch.float32
        close(grads_f[name], grads_n[name], name)
