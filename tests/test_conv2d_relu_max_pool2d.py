"""ptfast.conv2d_relu_max_pool2d against F.max_pool2d(F.relu(F.conv2d(...))): forward and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ptfast
from common_utils import DEVICES, assert_block_matches_native, block_inputs, make_data, native_block
from ptfast._shapes import conv_output_size, pool_output_size

# The whole module runs on both CPU paths of the fused block, direct and vendor.
pytestmark = pytest.mark.usefixtures("conv_block")

BASE = dict(n=2, c=3, oc=4, h=10, w=9, kernel=3, groups=1, bias=True)

# (id, shape overrides, op keyword arguments)
GRID = [
    ("mnist_block1", dict(n=3, c=1, oc=10, h=28, w=28, kernel=5), {}),
    ("mnist_block2", dict(n=3, c=10, oc=20, h=12, w=12, kernel=5), {}),
    ("batch0", dict(n=0), {}),
    ("batch1", dict(n=1), {}),
    ("batch_odd", dict(n=5), {}),
    ("one_input_channel", dict(c=1), {}),
    *[(f"kernel{k}", dict(kernel=k, h=14, w=13), {}) for k in range(1, 8)],
    ("kernel_non_square", dict(kernel=(3, 5)), {}),
    ("kernel_non_square_tall", dict(kernel=(5, 2), h=13), {}),
    ("stride2", {}, dict(stride=2, pool_kernel_size=2)),
    ("stride_1x2", dict(h=12, w=15), dict(stride=(1, 2))),
    ("stride_2x1", dict(h=15, w=12), dict(stride=(2, 1))),
    ("stride3_pool1", dict(h=16, w=16), dict(stride=3, pool_kernel_size=1)),
    ("padding1", {}, dict(padding=1)),
    ("padding_2x0", {}, dict(padding=(2, 0))),
    ("padding_same_odd_kernel", {}, dict(padding="same")),
    ("padding_same_even_kernel", dict(kernel=(4, 2)), dict(padding="same")),
    ("padding_same_dilated", dict(kernel=2), dict(padding="same", dilation=(3, 2))),
    ("padding_valid", {}, dict(padding="valid")),
    ("dilation2", dict(h=13, w=12), dict(dilation=2)),
    ("dilation_1x3", dict(h=11, w=14), dict(dilation=(1, 3))),
    ("dilation_padding_stride", dict(h=15, w=16), dict(dilation=2, padding=2, stride=2)),
    ("groups2", dict(c=4, oc=6, groups=2), {}),
    ("groups3_depthwise", dict(c=3, oc=3, groups=3), {}),
    ("groups_many_channels", dict(c=6, oc=12, groups=3), dict(padding=1)),
    ("wide_channel_block", dict(c=2, oc=19), {}),
    ("pool_kernel1", {}, dict(pool_kernel_size=1)),
    ("pool_kernel3", dict(h=14, w=14), dict(pool_kernel_size=3)),
    ("pool_kernel_2x3", dict(h=13, w=14), dict(pool_kernel_size=(2, 3))),
    ("pool_stride1_overlapping", {}, dict(pool_kernel_size=3, pool_stride=1)),
    ("pool_stride_1x2", {}, dict(pool_kernel_size=2, pool_stride=(1, 2))),
    ("pool_stride3", dict(h=16, w=17), dict(pool_kernel_size=2, pool_stride=3)),
    ("pool_stride_gt_kernel", dict(h=16, w=16), dict(pool_kernel_size=2, pool_stride=4)),
    ("pool_padding1", {}, dict(pool_kernel_size=3, pool_padding=1)),
    ("pool_padding_1x0", {}, dict(pool_kernel_size=(2, 3), pool_padding=(1, 0))),
    ("pool_padding_stride1", {}, dict(pool_kernel_size=3, pool_stride=1, pool_padding=1)),
    ("ceil_mode", dict(h=11, w=13), dict(ceil_mode=True)),
    ("ceil_mode_padding", dict(h=12, w=11), dict(pool_kernel_size=3, pool_stride=2, pool_padding=1, ceil_mode=True)),
    ("ceil_mode_stride3", dict(h=14, w=15), dict(pool_kernel_size=2, pool_stride=3, ceil_mode=True)),
    ("odd_spatial", dict(h=13, w=11), {}),
    ("tiny_spatial", dict(h=3, w=3, kernel=2), {}),
    ("no_bias", dict(bias=False), {}),
    # Pooled rows longer than a vector (several chunks a row on AVX-512, in
    # both dtypes); the stride-3 rows span too many columns for a chunk's
    # two-vector load and take gathers.
    ("wide_rows", dict(h=9, w=70), {}),
    ("wide_rows_pool3_padding_ceil", dict(h=9, w=69), dict(pool_kernel_size=3, pool_padding=1, ceil_mode=True)),
    ("wide_rows_pool3_overlapping", dict(h=8, w=41), dict(pool_kernel_size=3, pool_stride=1)),
    ("wide_rows_pool_stride3", dict(h=8, w=100), dict(pool_kernel_size=2, pool_stride=3)),
    ("large_window_int32_codes", dict(h=20, w=20, kernel=1), dict(pool_kernel_size=16)),
    ("all_options", dict(n=3, c=4, oc=6, h=17, w=15, kernel=(3, 2), groups=2),
     dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), pool_kernel_size=(3, 2), pool_stride=(2, 1),
          pool_padding=(1, 1), ceil_mode=True)),
]


def _inputs(shape_overrides, dtype, seed=0, device="cpu"):
    cfg = {**BASE, **shape_overrides}
    return block_inputs(cfg["n"], cfg["c"], cfg["oc"], cfg["h"], cfg["w"], cfg["kernel"], cfg["groups"],
                        cfg["bias"], dtype, seed, device)


@pytest.mark.parametrize("shape,kwargs", [(s, k) for _, s, k in GRID], ids=[i for i, _, _ in GRID])
def test_matches_native(shape, kwargs, dtype, device):
    x, w, b = _inputs(shape, dtype, device=device)
    assert_block_matches_native(x, w, b, {**kwargs, "groups": shape.get("groups", 1)})


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous_input(layout, dtype, device):
    x, w, b = _inputs(dict(h=12, w=12), dtype, device=device)
    with torch.no_grad():
        if layout == "channels_last":
            view = x.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            view = torch.cat([x, x], dim=3)[..., ::2]
        else:
            view = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not view.is_contiguous()
    view.requires_grad_()
    assert_block_matches_native(view, w, b, dict(padding=1))


def test_non_contiguous_weight(dtype):
    x, w, b = _inputs({}, dtype)
    w_t = w.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not w_t.is_contiguous()
    assert_block_matches_native(x, w_t, b, {})


def test_only_some_inputs_need_grad(dtype):
    x, w, b = _inputs({}, dtype)
    assert_block_matches_native(x.detach(), w, b.detach(), {})
    assert_block_matches_native(x, w.detach(), None, {})
    assert_block_matches_native(x.detach(), w.detach(), b, {})


def test_unbatched_input(dtype):
    x, w, b = _inputs(dict(n=1), dtype)
    x3 = x.detach()[0].requires_grad_()
    out = ptfast.conv2d_relu_max_pool2d(x3, w, b, padding=1)
    assert out.dim() == 3
    assert_block_matches_native(x3, w, b, dict(padding=1))


@st.composite
def block_configs(draw):
    groups = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    pool_kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pool_stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pool_padding = (draw(st.integers(0, pool_kernel[0] // 2)), draw(st.integers(0, pool_kernel[1] // 2)))
    ceil_mode = draw(st.booleans())
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 48))
    conv = [conv_output_size(s, k, st_, p, d) for s, k, st_, p, d in zip((h, w), kernel, stride, padding, dilation)]
    assume(min(conv) >= 1)
    pooled = [pool_output_size(s, k, st_, p, ceil_mode) for s, k, st_, p in zip(conv, pool_kernel, pool_stride, pool_padding)]
    assume(min(pooled) >= 1)
    shape = dict(n=draw(st.integers(0, 3)), c=groups * draw(st.integers(1, 3)), oc=groups * draw(st.integers(1, 4)),
                 h=h, w=w, kernel=kernel, groups=groups, bias=draw(st.booleans()))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, pool_kernel_size=pool_kernel,
                  pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
    return shape, kwargs, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(config=block_configs(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_configurations(config, dtype, device):
    shape, kwargs, seed = config
    x, w, b = _inputs(shape, dtype, seed, device)
    assert_block_matches_native(x, w, b, kwargs, seed=seed)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, padding=1), dict(dilation=2, groups=2, pool_kernel_size=3, pool_stride=1, pool_padding=1),
     dict(padding="same", ceil_mode=True, pool_kernel_size=3)],
    ids=["default", "stride_padding", "dilation_groups_pool", "same_ceil"],
)
def test_gradcheck(kwargs, device):
    x, w, b = block_inputs(2, 4, 4, 8, 7, 3, kwargs.get("groups", 1), True, torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda *t: ptfast.conv2d_relu_max_pool2d(*t, **kwargs), (x, w, b))


@pytest.mark.parametrize(
    "args",
    [
        ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False),
        ([2, 1], [1, 2], [1, 2], 2, [3, 2], [1, 2], [1, 1], True),
    ],
    ids=["default", "all_options"],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(args, with_bias, device):
    x, w, b = block_inputs(2, 4, 6, 11, 10, 3, args[3], with_bias, torch.float64, device=device)
    torch.library.opcheck(torch.ops.ptfast.conv2d_relu_max_pool2d.default, (x, w, b, *args))
    # The op with indices and the backward op are not differentiable themselves.
    x, w, b = (t.detach() if t is not None else None for t in (x, w, b))
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(x, w, b, *args)
    torch.library.opcheck(torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes.default, (x, w, b, *args))
    torch.library.opcheck(
        torch.ops.ptfast._conv2d_relu_max_pool2d_backward.default,
        (torch.randn_like(out), x, w, codes, *args, [True, True, with_bias]),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    def model(x, w1, b1, w2, b2):
        y = ptfast.conv2d_relu_max_pool2d(x, w1, b1)
        y = ptfast.conv2d_relu_max_pool2d(y, w2, b2, padding="same")
        return ptfast.log_softmax(y.flatten(1), dim=1)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    x = make_data((3, 1, 16, 16), torch.float32, g).requires_grad_()
    params = [make_data(s, torch.float32, g, 0.25).requires_grad_() for s in [(4, 1, 5, 5), (4,), (6, 4, 3, 3), (6,)]]
    out = compiled(x, *params)
    ref = model(x, *params)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), [x, *params])
    ref_grads = torch.autograd.grad(ref.sum(), [x, *params])
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_saves_only_compact_codes_for_backward():
    """The forward keeps input, weight and one uint8 code per pooled output: no conv-sized tensor."""
    x, w, b = block_inputs(4, 1, 10, 28, 28, 5, 1, True, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    shapes = {tuple(t.shape): t.dtype for t in saved}
    assert shapes == {tuple(x.shape): x.dtype, tuple(w.shape): w.dtype, tuple(out.shape): torch.uint8}


def test_no_codes_without_grad():
    x, w, b = block_inputs(2, 3, 4, 10, 10, 3, 1, True, torch.float32)
    with torch.no_grad():
        out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    assert out.grad_fn is None
    out = ptfast.conv2d_relu_max_pool2d(x.detach(), w.detach(), b.detach())
    assert out.grad_fn is None


def test_backward_op_computes_only_masked_gradients():
    x, w, b = block_inputs(2, 3, 4, 10, 10, 3, 1, True, torch.float64)
    args = ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(x.detach(), w.detach(), b.detach(), *args)
    grad = torch.randn_like(out)
    gi, gw, gb = torch.ops.ptfast._conv2d_relu_max_pool2d_backward(grad, x.detach(), w.detach(), codes, *args, [False, True, False])
    assert gi is None and gb is None and gw.shape == w.shape
    ref_gw, = torch.autograd.grad(native_block(x, w, b), w, grad)
    torch.testing.assert_close(gw, ref_gw)


def test_double_backward_raises():
    x, w, b = block_inputs(2, 3, 4, 10, 10, 3, 1, True, torch.float64)
    out = ptfast.conv2d_relu_max_pool2d(x, w, b)
    gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="_conv2d_relu_max_pool2d_backward.*not implemented"):
        gx.sum().backward()


def test_ops_reachable_through_torch_ops():
    x, w, b = block_inputs(1, 2, 3, 8, 8, 3, 1, True, torch.float64)
    out = torch.ops.ptfast.conv2d_relu_max_pool2d(x, w, b, [1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)
    torch.testing.assert_close(out, native_block(x, w, b))
