"""torch.func transforms through both ops against the native composites: grad, vjp, jacrev, vmap
(batching rules, never torch's per-sample fallback), their compositions (per-sample gradients),
and what stays unsupported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import ptfast
from common_utils import make_data, native_block, tolerances
from ptfast.models import MnistCNN

BLOCK_ARGS = ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    """torch.vmap raises where it would fall back to its slow per-sample loop (and print its
    warning): every op a test vmaps must have a batching rule."""
    enabled = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(enabled)


def data(shape, dtype, seed=0, scale=1.0) -> torch.Tensor:
    return make_data(shape, dtype, torch.Generator().manual_seed(seed), scale)


def assert_all_close(got, want, dtype) -> None:
    """Tensors, or sequences of them, equal up to the dtype's test tolerance."""
    got, want = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (got, want))
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tolerances(dtype))


# An op without a batching rule, to show that the checks below would catch one.
_LIB = torch.library.Library("ptfast_test_func", "FRAGMENT")
_LIB.define("plain(Tensor x) -> Tensor")
_LIB.impl("plain", lambda x: x.clone(), "CPU")


def test_fallback_guard_catches_an_op_without_batching_rule():
    with pytest.raises(RuntimeError, match="fallback"):
        vmap(torch.ops.ptfast_test_func.plain)(torch.randn(3, 2))


def test_no_fallback_warning(capfd):
    torch._C._functorch._set_vmap_fallback_enabled(True)
    vmap(torch.ops.ptfast_test_func.plain)(torch.randn(3, 2))
    assert "performance drop" in capfd.readouterr().err
    w, b = torch.randn(2, 3, 3, 3), torch.randn(2)
    vmap(grad(lambda t: ptfast.log_softmax(t, -1)[0, 0]))(torch.randn(4, 3, 5))
    vmap(grad(lambda t: ptfast.conv2d_relu_max_pool2d(t, w, b).sum()))(torch.randn(4, 3, 8, 8))
    assert "performance drop" not in capfd.readouterr().err


# ---------------------------------------------------------------- log_softmax

# (per-sample shape, dim, vmapped dimension of the stacked input)
SOFTMAX_CASES = [((5,), 0, 0), ((3, 7), 1, 0), ((3, 7), 0, 1), ((3, 7), -1, 2), ((2, 3, 4), 1, 1), ((), 0, 0),
                 ((), -1, 0)]


@pytest.mark.parametrize("shape,dim,in_dim", SOFTMAX_CASES, ids=[f"{s}-dim{d}-in{i}" for s, d, i in SOFTMAX_CASES])
def test_log_softmax_vmap(shape, dim, in_dim, dtype):
    x = data((6, *shape), dtype, scale=4.0).movedim(0, in_dim)
    got = vmap(ptfast.log_softmax, in_dims=(in_dim, None))(x, dim)
    assert_all_close(got, vmap(F.log_softmax, in_dims=(in_dim, None))(x, dim), dtype)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_log_softmax_grad_vjp_jacrev(dim, dtype):
    x, weights = data((4, 6), dtype, scale=4.0), data((4, 6), dtype, seed=1)
    for fn_of in (lambda f: grad(lambda t: (f(t, dim) * weights).sum()), lambda f: jacrev(lambda t: f(t, dim))):
        assert_all_close(fn_of(ptfast.log_softmax)(x), fn_of(F.log_softmax)(x), dtype)
    out, pullback = vjp(lambda t: ptfast.log_softmax(t, dim), x)
    ref, ref_pullback = vjp(lambda t: F.log_softmax(t, dim), x)
    assert_all_close(out, ref, dtype)
    assert_all_close(pullback(weights), ref_pullback(weights), dtype)


@pytest.mark.parametrize("in_dim", [0, 1])
def test_log_softmax_per_sample_gradients(in_dim, dtype, device):
    x, weights = data((5, 3, 6), dtype, scale=4.0).to(device), data((3, 6), dtype, seed=1).to(device)

    def loss(f):
        return lambda t: (f(t, -1) * weights).sin().sum()

    per_sample = vmap(grad(loss(ptfast.log_softmax)), in_dims=in_dim)(x.movedim(0, in_dim))
    assert_all_close(per_sample, vmap(grad(loss(F.log_softmax)), in_dims=in_dim)(x.movedim(0, in_dim)), dtype)
    of_vmap = grad(lambda t: vmap(loss(ptfast.log_softmax))(t).sum())(x)
    assert_all_close(of_vmap, grad(lambda t: vmap(loss(F.log_softmax))(t).sum())(x), dtype)


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)], ids=str)
def test_log_softmax_backward_op_vmap(in_dims, dtype):
    output = F.log_softmax(data((4, 3, 5), dtype, scale=4.0), -1)
    grad_output = data((4, 3, 5), dtype, seed=1)
    args = [t if d is not None else t[0] for t, d in zip((grad_output, output), in_dims)]
    got = vmap(torch.ops.ptfast._log_softmax_backward, in_dims=(*in_dims, None))(*args, 1)
    want = torch.stack([
        torch.ops.ptfast._log_softmax_backward(*(t[i] if d is not None else t for t, d in zip(args, in_dims)), 1)
        for i in range(4)
    ])
    assert_all_close(got, want, dtype)


def test_log_softmax_vmap_checks_dim_per_sample():
    message = r"ptfast.log_softmax: `dim` must be in \[-2, 1\] for a tensor of shape \[3, 4\], got 2"
    with pytest.raises(RuntimeError, match=message):
        vmap(ptfast.log_softmax, in_dims=(0, None))(torch.randn(5, 3, 4), 2)


# ------------------------------------------------------------------ conv block

def block(x, w, b, groups=1, padding=0):
    return ptfast.conv2d_relu_max_pool2d(x, w, b, padding=padding, groups=groups)


def native(x, w, b, groups=1, padding=0):
    return native_block(x, w, b, padding=padding, groups=groups)


def block_data(dtype, batch=4, n=2, c=4, oc=6, groups=1, size=9, seed=0):
    """Stacked per-sample (input, weight, bias) of the block: (B, N, C, H, W), (B, OC, C/g, 3, 3), (B, OC)."""
    return (data((batch, n, c, size, size), dtype, seed), data((batch, oc, c // groups, 3, 3), dtype, seed + 1, 0.25),
            data((batch, oc), dtype, seed + 2))


# Which of (input, weight, bias) are vmapped, and over which dimension.
BLOCK_IN_DIMS = [(0, None, None), (1, None, None), (4, None, None), (0, 0, 0), (None, 0, 0), (None, 0, None),
                 (0, 0, None), (0, None, 0), (None, None, 0), (2, 1, 0)]


def vmapped_args(stacked, in_dims):
    """The stacked tensors laid out for ``in_dims``: moved there, or one sample's where not vmapped."""
    return [t[0] if d is None else t.movedim(0, d) for t, d in zip(stacked, in_dims)]


@pytest.mark.usefixtures("conv_block")
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("in_dims", BLOCK_IN_DIMS, ids=str)
def test_block_vmap(in_dims, groups, dtype):
    args = vmapped_args(block_data(dtype, groups=groups), in_dims)
    got = vmap(block, in_dims=(*in_dims, None))(*args, groups)
    assert_all_close(got, vmap(native, in_dims=(*in_dims, None))(*args, groups), dtype)


def test_block_vmap_over_unbatched_samples(dtype):
    """Each sample one (C, H, W) image, as per-sample gradient code passes them."""
    x, w, b = block_data(dtype, n=1)
    x = x[:, 0]
    assert_all_close(vmap(block, in_dims=(0, None, None))(x, w[0], b[0]),
                     vmap(native, in_dims=(0, None, None))(x, w[0], b[0]), dtype)


@pytest.mark.usefixtures("conv_block")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_block_grad_vjp_jacrev(bias, dtype):
    x, w, b = (t[0] for t in block_data(dtype, n=2, c=3, oc=4, size=8))
    b = b if bias else None
    argnums = (0, 1, 2) if bias else (0, 1)
    cotangent = data((2, 4, 3, 3), dtype, seed=5)

    def loss(f):
        return lambda x, w, b: (f(x, w, b) * cotangent).sum()

    assert_all_close(grad(loss(block), argnums)(x, w, b), grad(loss(native), argnums)(x, w, b), dtype)
    out, pullback = vjp(lambda x, w: block(x, w, b), x, w)
    ref, ref_pullback = vjp(lambda x, w: native(x, w, b), x, w)
    assert_all_close(out, ref, dtype)
    assert_all_close(pullback(cotangent), ref_pullback(cotangent), dtype)
    assert_all_close(jacrev(block, argnums)(x[:1], w, b), jacrev(native, argnums)(x[:1], w, b), dtype)


@pytest.mark.usefixtures("conv_block")
@pytest.mark.parametrize("in_dims", BLOCK_IN_DIMS, ids=str)
def test_block_per_sample_gradients(in_dims, dtype, device):
    """vmap(grad(...)): each sample's gradients with respect to input, weight and bias."""
    stacked = [t.to(device) for t in block_data(dtype, n=1, groups=2)]
    cotangent = data((1, 6, 3, 3), dtype, seed=5).to(device)
    args = vmapped_args(stacked, in_dims)

    def loss(f):
        return lambda x, w, b: (f(x, w, b, groups=2) * cotangent).square().sum()

    got = vmap(grad(loss(block), argnums=(0, 1, 2)), in_dims=in_dims)(*args)
    assert_all_close(got, vmap(grad(loss(native), argnums=(0, 1, 2)), in_dims=in_dims)(*args), dtype)


@pytest.mark.usefixtures("conv_block")
@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, 0), (None, 0, None)], ids=str)
def test_block_grad_of_vmap(in_dims, dtype):
    args = vmapped_args(block_data(dtype), in_dims)

    def loss(f):
        return lambda *a: vmap(f, in_dims=in_dims)(*a).square().sum()

    assert_all_close(grad(loss(block), argnums=(0, 1, 2))(*args), grad(loss(native), argnums=(0, 1, 2))(*args), dtype)


@pytest.mark.parametrize("in_dims", [(0, None, None, 0), (0, 0, None, 0), (None, 0, 0, None), (0, None, 0, None),
                                     (None, None, None, 0)], ids=str)
@pytest.mark.parametrize("mask", [(True, False, False), (True, True, True), (False, True, False)], ids=str)
def test_block_backward_op_vmap(in_dims, mask, dtype):
    """The private ops' own rules against a loop over the samples: the codes and gradients are exact."""
    x, w, b = block_data(dtype, groups=2)
    args = (*BLOCK_ARGS[:3], 2, *BLOCK_ARGS[4:])
    outs, codes = zip(*[torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(x[i], w[i], b[i], *args) for i in range(4)])
    got = vmap(torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes, in_dims=(0, 0, 0, *[None] * 8))(x, w, b, *args)
    assert torch.equal(got[0], torch.stack(outs)) and torch.equal(got[1], torch.stack(codes))

    grad_output = data(outs[0].shape, dtype, seed=7).expand(4, *outs[0].shape).contiguous()
    stacked = (grad_output, x, w, torch.stack(codes))
    sample_args = [t if d is not None else t[0] for t, d in zip(stacked, in_dims)]

    def sample(i):
        return [t[i] if d is not None else t for t, d in zip(sample_args, in_dims)]

    def needed_gradients(*tensors):
        grads = torch.ops.ptfast._conv2d_relu_max_pool2d_backward(*tensors, *args, list(mask))
        assert [g is not None for g in grads] == list(mask)
        return [g for g in grads if g is not None]

    got = vmap(needed_gradients, in_dims=in_dims)(*sample_args)
    want = [torch.stack(g) for g in zip(*(needed_gradients(*sample(i)) for i in range(4)))]
    assert_all_close(got, want, dtype)


def test_block_vmap_checks_ranks_per_sample():
    x, w, b = block_data(torch.float32)

    def op(*in_dims):
        return vmap(torch.ops.ptfast.conv2d_relu_max_pool2d, in_dims=(*in_dims, *[None] * 8))

    with pytest.raises(RuntimeError, match=r"`input` must be 4-D \(N, C, H, W\), got 3-D with shape \[4, 9, 9\]"):
        op(0, None, None)(x[:, 0], w[0], b[0], *BLOCK_ARGS)
    with pytest.raises(RuntimeError, match=r"`weight` must be 4-D"):
        op(0, 0, 0)(x, w[:, 0], b, *BLOCK_ARGS)
    with pytest.raises(RuntimeError, match=r"`bias` must have shape \(6,\), got \[6, 1\]"):
        op(0, 0, 0)(x, w, b[..., None], *BLOCK_ARGS)


# --------------------------------------------------------------- the whole model

def test_mnist_cnn_per_sample_gradients(dtype):
    """Opacus's computation: each sample's gradient of the loss, the fused model against the native one."""
    torch.manual_seed(0)
    fused = MnistCNN(fused=True).to(dtype).eval()
    native_model = MnistCNN(fused=False).to(dtype).eval()
    native_model.load_state_dict(fused.state_dict())
    params = {k: v.detach() for k, v in fused.named_parameters()}
    images, targets = data((3, 1, 28, 28), dtype), torch.tensor([3, 1, 4])

    def per_sample(model):
        def loss(p, image, target):
            return F.nll_loss(functional_call(model, p, (image[None],)), target[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, images, targets)

    got, want = per_sample(fused), per_sample(native_model)
    for name in params:
        torch.testing.assert_close(got[name], want[name], **tolerances(dtype), msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- unsupported

# torch's forward AD loads its jvp decompositions through torch.jit.script, deprecated in torch 2.14.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_is_refused():
    x, w, b = (t[0] for t in block_data(torch.float64, n=1, size=8))
    s = torch.randn(3, 4, dtype=torch.float64)
    message = "forward-mode AD .* is not supported"
    with pytest.raises(NotImplementedError, match="ptfast.log_softmax: " + message):
        jvp(lambda t: ptfast.log_softmax(t, 1), (s,), (torch.ones_like(s),))
    with pytest.raises(NotImplementedError, match="ptfast.log_softmax: " + message):
        jacfwd(lambda t: ptfast.log_softmax(t, 1))(s)
    with pytest.raises(NotImplementedError, match="ptfast.conv2d_relu_max_pool2d: " + message):
        jvp(lambda t: block(t, w, b), (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="ptfast.log_softmax: " + message):
        hessian(lambda t: ptfast.log_softmax(t, 1).sin().sum())(s)
    with pytest.raises(NotImplementedError, match="forward AD with ptfast::_conv2d_relu_max_pool2d_with_codes"):
        hessian(lambda t: block(t, w, b).sum())(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="ptfast.conv2d_relu_max_pool2d: " + message):
            block(dual, w, b)


def test_second_order_raises():
    x, w, b = (t[0] for t in block_data(torch.float64, n=1, size=8))
    s = torch.randn(5, dtype=torch.float64)
    message = "derivative for ptfast::{} is not implemented"
    with pytest.raises(RuntimeError, match=message.format("_log_softmax_backward")):
        grad(lambda t: grad(lambda u: ptfast.log_softmax(u, 0).sin().sum())(t).sum())(s)
    with pytest.raises(RuntimeError, match=message.format("_conv2d_relu_max_pool2d_backward")):
        grad(lambda t: grad(lambda u: block(u, w, b).square().sum())(t).sum())(x)
    with pytest.raises(RuntimeError, match=message.format("_log_softmax_backward")):
        jacrev(jacrev(lambda t: ptfast.log_softmax(t, 0)))(s)


# ------------------------------------------------------------ compiled autograd

def test_compiled_autograd_traces_both_backwards():
    """Compiled autograd puts both backward nodes into its graph as calls it traces."""
    from torch._dynamo import compiled_autograd

    x, w, b = (t[0].requires_grad_() for t in block_data(torch.float32, n=2, size=10))
    graphs = []

    def compiler(gm):
        graphs.append(gm.code)
        return torch.compile(gm, backend="eager")

    def backward():
        out = ptfast.log_softmax(block(x, w, b).flatten(1), 1)
        out.backward(data(out.shape, torch.float32, seed=3))
        grads = [t.grad for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        return grads

    want = backward()
    with compiled_autograd._enable(compiler):
        got = backward()
    assert_all_close(got, want, torch.float32)
    assert "PtfastLogSoftmaxBackward" in graphs[0] and "PtfastConv2dReluMaxPool2dBackward" in graphs[0]
