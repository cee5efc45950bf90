"""ptfast.conv2d_relu_max_pool2d against F.max_pool2d(F.relu(F.conv2d(...))): forward and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptfast
from common_utils import (
    DEVICES,
    GRID,
    assert_block_matches_native,
    block_inputs,
    grid_inputs,
    make_data,
    native_block,
)
from strategies import block_configs

# The whole module runs on both CPU paths of the fused block, direct and vendor.
pytestmark = pytest.mark.usefixtures("conv_block")


@pytest.mark.parametrize("shape,kwargs", [(s, k) for _, s, k in GRID], ids=[i for i, _, _ in GRID])
def test_matches_native(shape, kwargs, dtype, device):
    x, w, b = grid_inputs(shape, dtype, device=device)
    assert_block_matches_native(x, w, b, {**kwargs, "groups": shape.get("groups", 1)})


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous_input(layout, dtype, device):
    x, w, b = grid_inputs(dict(h=12, w=12), dtype, device=device)
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
    x, w, b = grid_inputs({}, dtype)
    w_t = w.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not w_t.is_contiguous()
    assert_block_matches_native(x, w_t, b, {})


def test_only_some_inputs_need_grad(dtype):
    x, w, b = grid_inputs({}, dtype)
    assert_block_matches_native(x.detach(), w, b.detach(), {})
    assert_block_matches_native(x, w.detach(), None, {})
    assert_block_matches_native(x.detach(), w.detach(), b, {})


def test_unbatched_input(dtype):
    x, w, b = grid_inputs(dict(n=1), dtype)
    x3 = x.detach()[0].requires_grad_()
    out = ptfast.conv2d_relu_max_pool2d(x3, w, b, padding=1)
    assert out.dim() == 3
    assert_block_matches_native(x3, w, b, dict(padding=1))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(config=block_configs(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_configurations(config, dtype, device):
    shape, kwargs, seed = config
    x, w, b = grid_inputs(shape, dtype, seed, device)
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


def test_backward_allocates_input_sized_memory_once():
    """The backward allocates memory the size of the input once, for the gradient it returns: on
    the vendor path convolution_backward's, with none of its own beside it (one of each would
    raise a training step's peak by the input's size)."""
    x, w, b = block_inputs(8, 32, 4, 32, 32, 3, 1, True, torch.float32)
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    grad = torch.ones_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(out, [x, w, b], grad)
    # The innermost ops that allocate (a zeros() also reports its empty()'s bytes).
    allocations = [e.cpu_memory_usage for e in prof.events()
                   if e.cpu_memory_usage > 0 and not any(c.cpu_memory_usage for c in e.cpu_children)]
    assert allocations.count(x.nbytes) == 1, allocations


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
