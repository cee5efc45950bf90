"""ptfast.models.MnistCNN: the tutorial's MNIST network, fused and native."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ptfast
from ptfast.models import MnistCNN
from tutorial import TRAJECTORY_TOL, Net, train_losses


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def seeded(make, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return make().to(dtype)


def run(model, x, seed=7):
    """Output, input gradient, parameter gradients and the next random draw of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    after = torch.rand(4)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed + 1)))
    return out.detach(), x.grad, [p.grad for p in model.parameters()], after


def test_submodules_and_parameters_are_the_tutorials():
    net = seeded(Net)
    for fused in (False, True):
        model = seeded(lambda: MnistCNN(fused=fused))
        assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "conv2_drop", "fc1", "fc2"]
        assert list(model.state_dict()) == list(net.state_dict())
        for (name, p), (_, q) in zip(net.named_parameters(), model.named_parameters()):
            assert torch.equal(p, q), name  # same init order, same values from the same seed
        assert isinstance(model.conv2_drop, nn.Dropout2d) and model.conv2_drop.p == 0.5
    fused = MnistCNN()
    assert fused.fused and isinstance(fused.conv1, ptfast.nn.Conv2dReLUMaxPool2d)
    assert fused.conv1.pool_kernel_size == (2, 2) and fused.conv2.pool_stride == (2, 2)
    assert type(MnistCNN(fused=False).conv1) is nn.Conv2d


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 3D input")
@pytest.mark.parametrize("fused", [False, True])
def test_shapes(fused):
    model = MnistCNN(fused=fused).eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))  # log-probabilities
    assert model(torch.randn(1, 28, 28)).shape == (1, 10)
    if fused:  # unbatched + Dropout2d in training mode would not match the native net: refused
        with pytest.raises(RuntimeError, match="batched 4-D input"):
            model.train()(torch.randn(1, 28, 28))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_native_variant_is_exactly_the_tutorials_net(train):
    net = seeded(Net).train(train)
    native = seeded(lambda: MnistCNN(fused=False)).train(train)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    for a, b in zip(run(net, x), run(native, x)):
        if isinstance(a, list):
            assert all(torch.equal(p, q) for p, q in zip(a, b))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_matches_native(dtype, train):
    native = seeded(lambda: MnistCNN(fused=False), dtype=dtype).train(train)
    fused = seeded(lambda: MnistCNN(fused=True), dtype=dtype).train(train)
    x = torch.randn(16, 1, 28, 28, dtype=dtype, generator=torch.Generator().manual_seed(3))
    out_n, gx_n, grads_n, rng_n = run(native, x)
    out_f, gx_f, grads_f, rng_f = run(fused, x)
    torch.testing.assert_close(out_f, out_n, **TOL[dtype])  # in train mode: only if the masks match
    torch.testing.assert_close(gx_f, gx_n, **TOL[dtype])
    for (name, _), p, q in zip(native.named_parameters(), grads_n, grads_f):
        torch.testing.assert_close(q, p, msg=lambda m, name=name: f"{name}: {m}", **TOL[dtype])
    assert torch.equal(rng_f, rng_n)
    if train:  # dropout is active: another seed gives another output
        assert not torch.allclose(run(fused, x, seed=8)[0], out_f)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fifty_sgd_steps_fused_vs_native(dtype):
    native_losses, native = train_losses(seeded(lambda: MnistCNN(fused=False), dtype=dtype), dtype)
    fused_losses, fused = train_losses(seeded(lambda: MnistCNN(fused=True), dtype=dtype), dtype)
    tol = TRAJECTORY_TOL[dtype]
    assert native_losses[0] != native_losses[-1]
    assert fused_losses == pytest.approx(native_losses, rel=tol["rel"], abs=0)
    for (name, p), q in zip(native.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=tol["param_atol"], msg=lambda m, name=name: f"{name}: {m}")


def test_state_dicts_interchange_with_net_and_fuse():
    net, fused_net = seeded(Net, seed=1), ptfast.fuse(seeded(Net, seed=2))
    fused, native = seeded(MnistCNN, seed=3), seeded(lambda: MnistCNN(fused=False), seed=4)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    # Net -> MnistCNN(fused=True) -> fuse(Net) -> MnistCNN(fused=False) -> Net
    chain = [net, fused, fused_net, native, seeded(Net, seed=5)]
    for src, dst in zip(chain, chain[1:]):
        dst.load_state_dict(src.state_dict())
        src.eval(), dst.eval()
        torch.testing.assert_close(dst(x), net.eval()(x), **TOL[torch.float64])
    for model in chain:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), net.parameters()))


def test_fuse_of_mnistcnn():
    """fuse(MnistCNN(fused=False)) fuses both blocks; fuse(MnistCNN(fused=True)) changes nothing."""
    native = seeded(lambda: MnistCNN(fused=False))
    fused_native = ptfast.fuse(native)
    calls = [n for n in fused_native.graph.nodes if n.target is ptfast.functional.conv2d_relu_max_pool2d]
    assert len(calls) == 2
    already = ptfast.fuse(seeded(MnistCNN))
    modules = dict(already.named_modules())
    fused_modules = [n for n in already.graph.nodes
                     if n.op == "call_module" and isinstance(modules[n.target], ptfast.nn.Conv2dReLUMaxPool2d)]
    assert len(fused_modules) == 2
    assert not any(n.target in (F.max_pool2d, F.relu, torch.conv2d) and n.args[0].op == "call_module"
                   and n.args[0].target.startswith("conv") for n in already.graph.nodes)
    assert isinstance(already, fx.GraphModule)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    for model in (native, fused_native, already):
        model.train()
    outs = [run(m, x)[0] for m in (native, fused_native, already)]
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float64])
    torch.testing.assert_close(outs[2], outs[0], **TOL[torch.float64])
