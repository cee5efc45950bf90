"""Memory formats: outputs and gradients in native's format, channels-last and mixed cases included.

Native's rules on CPU (torch 2.14), which these tests hold ptfast to:

* conv2d's output, and so relu's and max_pool2d's, and conv2d's input and weight gradients are
  channels-last when the input or the weight suggests channels-last, contiguous otherwise;
* log_softmax's output and gradient are contiguous whatever the input's strides.

Gradients are taken with ``torch.autograd.grad``: a leaf's ``.grad`` is restrided to the leaf's
own layout by autograd, which would hide the format the backward returns.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from common_utils import block_inputs, make_data, native_block, tolerances

import ptfast

CL = torch.channels_last
FORMATS = {"nchw": torch.contiguous_format, "nhwc": CL}


def layout(t: torch.Tensor) -> tuple:
    """What a memory-format comparison looks at: both contiguity flags, and the strides where no size is 1
    (size-1 dimensions leave strides ambiguous, and native itself is not consistent there)."""
    flags = (t.is_contiguous(), t.is_contiguous(memory_format=CL) if t.dim() == 4 else None)
    return flags + ((tuple(t.stride()),) if all(s > 1 for s in t.shape) else ())


def assert_same_layout(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert layout(got) == layout(want), f"{what}: got strides {got.stride()}, native {want.stride()}"


# (name, n, c, oc, hw, kernel, groups, block kwargs)
BLOCKS = [
    ("3to8_k3", 2, 3, 8, 12, 3, 1, dict(padding=1)),
    ("1to6_k5", 2, 1, 6, 14, 5, 1, {}),
    ("16to32_k5_overlap", 2, 16, 32, 13, 5, 1, dict(padding=2, pool_kernel_size=3, pool_stride=2)),
    ("8to8_depthwise_ceil", 2, 8, 8, 11, 3, 8, dict(padding=1, ceil_mode=True)),
]


@pytest.mark.parametrize("grad_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("weight_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("input_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("block", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_follows_native_memory_format(block, input_format, weight_format, grad_format, conv_block, dtype):
    _, n, c, oc, hw, kernel, groups, kwargs = block
    kwargs = {**kwargs, "groups": groups}
    x, w, b = block_inputs(n, c, oc, hw, hw, kernel, groups, True, dtype)
    with torch.no_grad():
        x = x.contiguous(memory_format=FORMATS[input_format]).requires_grad_()
        w = w.contiguous(memory_format=FORMATS[weight_format]).requires_grad_()
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    ref = native_block(x, w, b, **kwargs)
    tol = tolerances(dtype)
    torch.testing.assert_close(out, ref, **tol)
    assert_same_layout(out, ref, "output")
    grad = make_data(ref.shape, dtype, torch.Generator().manual_seed(1))
    grad = grad.contiguous(memory_format=FORMATS[grad_format])
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad {name}: {m}", **tol)
        assert_same_layout(a, e, f"grad {name}")


@pytest.mark.parametrize("input_format", ["nchw", "nhwc"])
def test_codes_follow_the_output(input_format, conv_block):
    x, w, b = block_inputs(2, 3, 8, 12, 12, 3, 1, True, torch.float32)
    x = x.detach().contiguous(memory_format=FORMATS[input_format])
    args = (x, w.detach(), b.detach(), [1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(*args)
    assert out.stride() == codes.stride() == torch.empty(out.shape, memory_format=FORMATS[input_format]).stride()
    # The backward reads codes and grad_output in any layout.
    for layout_of_rest in (torch.contiguous_format, CL):
        grads = torch.ops.ptfast._conv2d_relu_max_pool2d_backward(
            torch.ones_like(out).contiguous(memory_format=layout_of_rest), *args[:2],
            codes.contiguous(memory_format=layout_of_rest), *args[3:], [True, True, True])
        ref = torch.ops.ptfast._conv2d_relu_max_pool2d_backward(
            torch.ones_like(out).contiguous(), *args[:2], codes.contiguous(), *args[3:], [True, True, True])
        for a, e in zip(grads, ref):
            torch.testing.assert_close(a, e)


def test_sliced_channels_last_input(conv_block):
    """A channels-last view that is not dense (a slice) still gives native's values and format."""
    x, w, b = block_inputs(2, 4, 8, 12, 24, 3, 1, True, torch.float64)
    view = x.detach().contiguous(memory_format=CL)[..., ::2].requires_grad_()
    out = ptfast.conv2d_relu_max_pool2d(view, w, b, padding=1)
    ref = native_block(view, w, b, padding=1)
    torch.testing.assert_close(out, ref)
    assert_same_layout(out, ref, "output")
    got = torch.autograd.grad(out, (view, w), torch.ones_like(ref))
    want = torch.autograd.grad(ref, (view, w), torch.ones_like(ref))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
        assert_same_layout(a, e, "grad")


@pytest.mark.parametrize("dim", [1, -1, 2, 0])
@pytest.mark.parametrize("input_format", ["nchw", "nhwc"])
def test_log_softmax_follows_native_memory_format(input_format, dim, dtype):
    g = torch.Generator().manual_seed(0)
    x = make_data((2, 5, 4, 3), dtype, g).contiguous(memory_format=FORMATS[input_format]).requires_grad_()
    out = ptfast.log_softmax(x, dim)
    ref = F.log_softmax(x, dim)
    tol = tolerances(dtype)
    torch.testing.assert_close(out, ref, **tol)
    assert_same_layout(out, ref, "output")
    for grad in (torch.randn(ref.shape, dtype=dtype, generator=g), torch.randn_like(x)):
        (got,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        (want,) = torch.autograd.grad(ref, x, grad, retain_graph=True)
        torch.testing.assert_close(got, want, **tol)
        assert_same_layout(got, want, "grad input")


def test_log_softmax_transposed_input():
    x = torch.randn(7, 5, dtype=torch.float64).t().requires_grad_()
    for dim in (0, 1):
        out, ref = ptfast.log_softmax(x, dim), F.log_softmax(x, dim)
        torch.testing.assert_close(out, ref)
        assert out.stride() == ref.stride()
        (got,) = torch.autograd.grad(out, x, torch.ones_like(out))
        (want,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
        assert got.stride() == want.stride()


@pytest.mark.parametrize("formats", [("nhwc", "nchw"), ("nchw", "nhwc"), ("nhwc", "nhwc")])
def test_opcheck_channels_last(formats, conv_block):
    """The fake kernels give the real kernels' strides (opcheck compares them)."""
    x, w, b = block_inputs(2, 4, 6, 11, 10, 3, 1, True, torch.float64)
    x = x.detach().contiguous(memory_format=FORMATS[formats[0]])
    w = w.detach().contiguous(memory_format=FORMATS[formats[1]])
    b = b.detach()
    args = ([1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    torch.library.opcheck(torch.ops.ptfast.conv2d_relu_max_pool2d.default, (x, w, b, *args))
    torch.library.opcheck(torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes.default, (x, w, b, *args))
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(x, w, b, *args)
    torch.library.opcheck(
        torch.ops.ptfast._conv2d_relu_max_pool2d_backward.default,
        (torch.randn_like(out), x, w, codes, *args, [True, True, True]),
    )
    y = x.contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.ptfast.log_softmax.default, (y, 1))
    out = torch.ops.ptfast.log_softmax(y, 1)
    torch.library.opcheck(torch.ops.ptfast._log_softmax_backward.default, (torch.randn_like(y), out, 1))


def test_torch_compile_keeps_channels_last(conv_block):
    def model(x, w1, b1, w2, b2):
        y = ptfast.conv2d_relu_max_pool2d(x, w1, b1, padding=1)
        return ptfast.conv2d_relu_max_pool2d(y, w2, b2, padding=1)

    x, w1, b1 = block_inputs(2, 3, 8, 16, 16, 3, 1, True, torch.float32)
    _, w2, b2 = block_inputs(2, 8, 16, 8, 8, 3, 1, True, torch.float32, seed=1)
    x = x.detach().contiguous(memory_format=CL).requires_grad_()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, w1, b1, w2, b2)
    ref = native_block(native_block(x, w1, b1, padding=1), w2, b2, padding=1)
    torch.testing.assert_close(out, ref)
    assert_same_layout(out, ref, "output")
    got = torch.autograd.grad(out, (x, w1, w2), torch.ones_like(out))
    want = torch.autograd.grad(ref, (x, w1, w2), torch.ones_like(ref))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
        assert_same_layout(a, e, "grad")


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.log_softmax(F.max_pool2d(F.relu(self.conv3(x)), 2), dim=1)


@pytest.mark.parametrize("weights", ["nchw", "nhwc"])
def test_fused_channels_last_model_stays_channels_last(weights):
    """With contiguous weights the last block can only be channels-last if every block before kept it."""
    torch.manual_seed(0)
    model = _Features().double()
    if weights == "nhwc":
        model = model.to(memory_format=CL)
    fused = ptfast.fuse(model)
    body = _Features.forward
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()

    def features(m):
        return F.max_pool2d(F.relu(m.conv3(F.max_pool2d(F.relu(m.conv2(
            F.max_pool2d(F.relu(m.conv1(x)), 2))), 2))), 2)

    out = fused(x)
    ref = body(model, x)
    torch.testing.assert_close(out, ref)
    assert_same_layout(out, ref, "output")
    # The fused blocks alone, without the contiguous log_softmax at the end.
    gm_features = ptfast.fuse(nn.Sequential(model.conv1, nn.ReLU(), nn.MaxPool2d(2), model.conv2, nn.ReLU(),
                                            nn.MaxPool2d(2), model.conv3, nn.ReLU(), nn.MaxPool2d(2)))
    feat = gm_features(x)
    assert feat.is_contiguous(memory_format=CL) and not feat.is_contiguous()
    torch.testing.assert_close(feat, features(model))
    got = torch.autograd.grad(feat, (x, *gm_features.parameters()), torch.ones_like(feat))
    want = torch.autograd.grad(features(model), (x, *model.parameters()), torch.ones_like(feat))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
        assert_same_layout(a, e, "grad")


@pytest.mark.parametrize("with_grad", [False, True], ids=["inference", "with_grad"])
@pytest.mark.parametrize(
    "pool", [{}, dict(pool_kernel_size=3, pool_stride=2, pool_padding=1, ceil_mode=True)], ids=["2x2", "3x3s2_padded_ceil"])
@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_channels_last_conv_output_pooled_like_native(dt, pool, with_grad):
    # The vendor epilogue pools a channels-last conv output straight from its pixels, 64 bytes of
    # channels per task: 40 channels fill one task and part of another in every dtype. Ties (a
    # constant patch), inf and NaN, padded and ceil_mode windows; with gradients the arg-max codes
    # decide where each gradient goes. Dyadic data: sums exact, outputs compared bit for bit.
    g = torch.Generator().manual_seed(3)
    dyadic = lambda *shape: torch.randint(-8, 8, shape, generator=g) / 8  # noqa: E731
    x = dyadic(2, 6, 11, 11)
    x[0, :, 2:7, 2:7] = 0.5
    x[1, 2, 3, 4] = float("inf")
    x[1, 4, 7, 7] = float("nan")
    x = x.to(dt).contiguous(memory_format=CL).requires_grad_(with_grad)
    w, b = dyadic(40, 6, 3, 3).to(dt), dyadic(40).to(dt)
    with ptfast.backends.cpu.flags(conv_block="vendor"):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1, **pool)
    ref = native_block(x, w, b, padding=1, **pool)
    assert_same_layout(out, ref, "output")
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    if with_grad:
        grad = dyadic(*ref.shape).to(dt)
        (got,) = torch.autograd.grad(out, x, grad)
        (want,) = torch.autograd.grad(ref, x, grad)
        assert_same_layout(got, want, "grad input")
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["direct", "vendor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_channels_last_matches_native(path, dtype):
    # Half precision and channels-last together: the vendor epilogue converts while it gathers
    # channels, the direct path converts an NCHW copy. Dyadic data: every sum is exact, so values
    # are compared bitwise and gradients within one half-precision rounding.
    g = torch.Generator().manual_seed(0)
    dyadic = lambda *shape: (torch.randint(-8, 8, shape, generator=g) / 8).to(dtype)  # noqa: E731
    x = dyadic(2, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = dyadic(24, 16, 3, 3).requires_grad_(), dyadic(24).requires_grad_()
    with ptfast.backends.cpu.flags(conv_block=path):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    ref = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)
    grad = dyadic(*ref.shape)
    with ptfast.backends.cpu.flags(conv_block=path):
        got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.is_contiguous(memory_format=torch.channels_last) == e.is_contiguous(
            memory_format=torch.channels_last)
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2)
