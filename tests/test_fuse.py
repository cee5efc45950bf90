"""ptfast.fuse: torch.fx rewriting of conv2d -> ReLU -> max_pool2d chains and log_softmax."""

from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ptfast
from ptfast import functional as ptf
from tutorial import TRAJECTORY_TOL, Net, train_losses


# ----------------------------------------------------------------------------- helpers

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def fused_calls(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is ptf.conv2d_relu_max_pool2d for n in gm.graph.nodes)


def ptfast_log_softmax_calls(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is ptf.log_softmax for n in gm.graph.nodes)


def native_pool_and_relu(gm: fx.GraphModule) -> int:
    """Native max-pool and ReLU ops (any form) left in the graph."""
    modules = dict(gm.named_modules())
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d, F.relu, torch.relu, torch.relu_):
            count += 1
        elif n.op == "call_method" and n.target in ("relu", "relu_"):
            count += 1
        elif n.op == "call_module" and isinstance(modules[n.target], (nn.MaxPool2d, nn.ReLU)):
            count += 1
    return count


def run(model: nn.Module, x: torch.Tensor, seed: int = 7):
    """Output, input gradient and parameter gradients of a forward/backward from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    after = torch.rand(4)  # the RNG state after the forward, as seen by the next random call
    g = torch.Generator().manual_seed(seed + 1)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=g))
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads, after


def assert_same_function(native: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool, seed: int = 7):
    """Outputs, gradients and RNG consumption of ``fused`` equal ``native``'s (same parameters)."""
    native.train(train)
    fused.train(train)
    out_n, gx_n, grads_n, rng_n = run(native, x, seed)
    out_f, gx_f, grads_f, rng_f = run(fused, x, seed)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out_f, out_n, **tol)
    torch.testing.assert_close(gx_f, gx_n, **tol)
    assert list(grads_f) == list(grads_n)
    for name in grads_n:
        if grads_n[name] is None:
            assert grads_f[name] is None, name
        else:
            torch.testing.assert_close(grads_f[name], grads_n[name], msg=lambda m, name=name: f"{name}: {m}", **tol)
    assert torch.equal(rng_f, rng_n), "the fused model consumed the RNG differently"


def seeded(cls, *args, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return cls(*args).to(dtype)


# ----------------------------------------------------------------------------- the tutorial's Net


def test_net_graph_uses_ptfast_ops():
    fused = ptfast.fuse(Net())
    assert isinstance(fused, fx.GraphModule)
    assert fused_calls(fused) == 2
    assert ptfast_log_softmax_calls(fused) == 1
    assert native_pool_and_relu(fused) == 1  # only the ReLU after fc1 is left
    nodes = list(fused.graph.nodes)
    # conv2_drop is still the same module call, now on the output of the second fused op.
    drop = next(n for n in nodes if n.op == "call_module" and n.target == "conv2_drop")
    assert drop.args[0].target is ptf.conv2d_relu_max_pool2d
    # F.dropout's `training` reads the fused module's flag at run time instead of a traced constant.
    dropout = next(n for n in nodes if n.target is F.dropout)
    assert isinstance(dropout.kwargs["training"], fx.Node)
    assert isinstance(fused.conv1, nn.Conv2d) and type(fused.conv1) is nn.Conv2d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_net_outputs_and_gradients_match(dtype, train):
    net = seeded(Net, dtype=dtype)
    fused = ptfast.fuse(net)
    x = torch.randn(16, 1, 28, 28, dtype=dtype, generator=torch.Generator().manual_seed(3))
    assert_same_function(net, fused, x, train)


def test_train_and_eval_switch_like_the_original():
    net = seeded(Net)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    fused_in_train = ptfast.fuse(net.train())
    fused_in_eval = ptfast.fuse(net.eval())
    for fused in (fused_in_train, fused_in_eval):
        assert_same_function(net, fused, x, train=False)
        assert_same_function(net, fused, x, train=True)
        fused.eval()
        torch.testing.assert_close(fused(x), fused(x), rtol=0, atol=0)  # no dropout in eval mode
        fused.train()
        assert not torch.equal(fused(x), fused(x))  # dropout in training mode


def test_dropout_masks_follow_the_seed():
    net = seeded(Net)
    fused = ptfast.fuse(net).train()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    out = [run(fused, x, seed)[0] for seed in (1, 1, 2)]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert not torch.allclose(out[0], out[2])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fifty_sgd_steps_match_native(dtype):
    native_losses, native = train_losses(seeded(Net, dtype=dtype), dtype)
    fused_losses, fused = train_losses(ptfast.fuse(seeded(Net, dtype=dtype)), dtype)
    tol = TRAJECTORY_TOL[dtype]
    assert native_losses[0] != native_losses[-1]  # it did train
    assert fused_losses == pytest.approx(native_losses, rel=tol["rel"], abs=0)
    for (name, p), (fname, q) in zip(native.named_parameters(), fused.named_parameters()):
        assert name == fname
        torch.testing.assert_close(q, p, rtol=0, atol=tol["param_atol"])


def test_state_dicts_interchange_and_original_is_untouched():
    net = seeded(Net)
    before = copy.deepcopy(net.state_dict())
    fused = ptfast.fuse(net)
    assert list(fused.state_dict()) == list(net.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert [p.shape for p in fused.parameters()] == [p.shape for p in net.parameters()]
    # A copy: nothing shared, the original unchanged.
    assert all(p is not q for p, q in zip(fused.parameters(), net.parameters()))
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Both ways.
    other = seeded(Net, seed=5)
    other.load_state_dict(fused.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), fused.parameters()))
    fused.load_state_dict(before)
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
    # Optimizer state too (parameters in the same order).
    opt_native = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    F.nll_loss(net(torch.randn(2, 1, 28, 28, dtype=torch.float64)), torch.tensor([1, 2])).backward()
    opt_native.step()
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_fused.load_state_dict(opt_native.state_dict())
    for p, q in zip(net.parameters(), fused.parameters()):
        assert torch.equal(opt_fused.state[q]["momentum_buffer"], opt_native.state[p]["momentum_buffer"])


def test_fuse_is_idempotent_and_copies_cleanly():
    net = seeded(Net)
    fused = ptfast.fuse(net)
    again = ptfast.fuse(fused)
    assert fused_calls(again) == 2 and ptfast_log_softmax_calls(again) == 1
    assert native_pool_and_relu(again) == 1
    assert list(again.state_dict()) == list(net.state_dict())
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    assert_same_function(net, again, x, train=True)
    # deepcopy and pickling keep the module and its state dict.
    for clone in (copy.deepcopy(fused), torch.load(_saved(fused), weights_only=False)):
        assert list(clone.state_dict()) == list(net.state_dict())
        assert_same_function(net, clone, x, train=True)


def _saved(module: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 3D input")
def test_unbatched_input():
    """3-D input works in eval mode; with Dropout2d training it raises instead of computing
    something else (torch's dropout2d treats 3-D input as (N, C, L), which does not commute with
    pooling)."""
    net = seeded(Net).eval()
    fused = ptfast.fuse(net)
    x = torch.randn(1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fused(x), net(x))
    fused.train()
    with pytest.raises(RuntimeError, match="batched 4-D input"):
        fused(x)


# ----------------------------------------------------------------------------- variants


class ReluBeforePool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class ModuleForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding="same")
        self.pool2 = nn.MaxPool2d(kernel_size=(2, 3))
        self.act2 = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.conv(x)))
        return self.act2(self.pool2(self.conv2(x)))


class TorchForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, dilation=2, groups=1)

    def forward(self, x):
        a = torch.relu(torch.max_pool2d(self.conv(x), 3, 2, 1))
        b = torch.max_pool2d(torch.relu_(self.conv(x)), kernel_size=[2], stride=[], padding=0)
        return torch.cat([a.flatten(1), b.flatten(1)], 1)


class InplaceAndMethods(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x), inplace=True), kernel_size=2, stride=1, ceil_mode=False)
        return F.max_pool2d(self.conv2(x), 2).relu_() + 0


class FunctionalConv(nn.Module):
    """F.conv2d on the model's own parameters, x.relu(), and F.dropout2d in the chain."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, padding=1, groups=2)
        y = F.dropout2d(y, p=0.25, training=self.training)
        return F.max_pool2d(y.relu(), 2, stride=2)


class InSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.Dropout2d(0.5, inplace=True), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.head(self.features(x))


class SharedConv(nn.Module):
    """The same conv module in two chains."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return F.relu(F.max_pool2d(self.conv(F.relu(F.max_pool2d(self.conv(x), 2))), 2))


class SecondUser(nn.Module):
    """The conv output is also used elsewhere: must stay native."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return F.max_pool2d(F.relu(y), 2).sum() + y.mean()


class NotAChain(nn.Module):
    """Things that look close but are not fusable; all stay native."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.reflect(x)), 2, ceil_mode=True)  # padding mode
        x = F.max_pool2d(F.relu(self.conv(x)), 2, dilation=2, padding=1)  # dilated pool
        x, _ = F.max_pool2d(F.relu(self.conv(x)), 2, return_indices=True)  # indices
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2, padding=1)  # batch norm inside
        x = F.max_pool2d(F.leaky_relu(self.conv(x)), 2, padding=1)  # another activation
        x = F.max_pool2d(F.dropout(F.relu(self.conv(x)), 0.5, self.training), 2, padding=1)  # element dropout
        return F.relu(self.conv(x))  # no pool


class LogSoftmaxForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.lsm = nn.LogSoftmax(dim=1)

    def forward(self, x):
        y = self.fc(x)
        return (self.lsm(y) + torch.log_softmax(y, 1) + y.log_softmax(dim=-1)
                + F.log_softmax(y, 1, dtype=torch.float64) + torch.special.log_softmax(y, 0))


VARIANTS = [
    # model, input shape, fused chains, ptfast log_softmax calls, native ReLU/pool ops left
    (ReluBeforePool, (2, 3, 8, 9), 1, 0, 0),
    (ModuleForms, (2, 3, 15, 14), 2, 0, 0),
    (TorchForms, (2, 3, 13, 13), 2, 0, 0),
    (InplaceAndMethods, (2, 3, 9, 9), 2, 0, 0),
    (FunctionalConv, (2, 4, 8, 8), 1, 0, 0),
    (InSequential, (2, 3, 10, 10), 2, 1, 0),
    (SharedConv, (2, 3, 8, 8), 2, 0, 0),
    (SecondUser, (2, 3, 8, 8), 0, 0, 2),
    (NotAChain, (2, 3, 32, 32), 0, 0, 11),
    (LogSoftmaxForms, (4, 6), 0, 5, 0),
]


@pytest.mark.parametrize("cls, shape, chains, log_softmaxes, native_left", VARIANTS, ids=[v[0].__name__ for v in VARIANTS])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_variants(cls, shape, chains, log_softmaxes, native_left, train):
    model = seeded(cls)
    fused = ptfast.fuse(model)
    assert fused_calls(fused) == chains
    assert ptfast_log_softmax_calls(fused) == log_softmaxes
    assert native_pool_and_relu(fused) == native_left
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert_same_function(model, fused, x, train)


def test_dropout2d_is_moved_after_the_fused_op_and_kept():
    fused = ptfast.fuse(InSequential())
    drop = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "features.1")
    assert drop.args[0].target is ptf.conv2d_relu_max_pool2d
    assert fused.features[1] is dict(fused.named_modules())["features.1"]
    assert isinstance(fused.features, nn.Sequential)  # the original tree, not fx's containers
    functional = ptfast.fuse(FunctionalConv())
    drop = next(n for n in functional.graph.nodes if n.target is F.dropout2d)
    assert drop.args[0].target is ptf.conv2d_relu_max_pool2d and drop.kwargs["p"] == 0.25


def test_model_without_chains_is_unchanged():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

    model = seeded(MLP)
    fused = ptfast.fuse(model)
    assert [n.target for n in fused.graph.nodes] == [n.target for n in fx.symbolic_trace(model).graph.nodes]
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_implicit_dim_log_softmax_stays_native():
    class Implicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.lsm = nn.LogSoftmax()

        def forward(self, x):
            return F.log_softmax(x) + self.lsm(x)

    fused = ptfast.fuse(Implicit())
    assert ptfast_log_softmax_calls(fused) == 0


def test_conv_with_hooks_stays_native_and_hooks_still_run():
    model = seeded(ReluBeforePool)
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = ptfast.fuse(model)
    assert fused_calls(fused) == 0
    fused(torch.randn(1, 3, 8, 9, dtype=torch.float64))
    assert seen == [torch.Size([1, 4, 8, 9])]


def _double_output(module, inputs, output):
    return output * 2


def test_unused_modules_buffers_attributes_and_hooks_survive_fuse_copy_and_pickle():
    class Odd(ReluBeforePool):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)
            self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64), persistent=False)
            self.offset = torch.tensor(1.0, dtype=torch.float64)  # a plain tensor attribute

        def forward(self, x):
            return super().forward(x) * self.scale + self.offset

    model = seeded(Odd)
    model.label = "odd"
    model.register_forward_hook(_double_output)
    fused = ptfast.fuse(model)
    assert fused_calls(fused) == 1
    keys = ["conv.weight", "conv.bias", "unused.weight", "unused.bias"]
    assert list(fused.state_dict()) == list(model.state_dict()) == keys
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    for clone in (fused, copy.deepcopy(fused), torch.load(_saved(fused), weights_only=False), ptfast.fuse(fused)):
        assert list(clone.state_dict()) == keys
        assert clone.label == "odd"  # plain attributes and the root's hooks are kept
        torch.testing.assert_close(clone(x), model(x))
    # The tensors the graph reads are the registered ones, so .to() reaches them.
    fused.float()
    assert fused.offset.dtype == fused.scale.dtype == torch.float32
    torch.testing.assert_close(fused(x.float()), model(x).float())


# ----------------------------------------------------------------------------- errors


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv(x), 2))
        if x.sum() > 0:
            x = x * 2
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ReluBeforePool()
        self.block = DataDependent()

    def forward(self, x):
        return self.block(self.stem(x)[:, :1])


def test_untraceable_model_raises_fuse_error_saying_where():
    with pytest.raises(ptfast.FuseError) as info:
        ptfast.fuse(Wrapper())
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "Wrapper" in message and "submodule 'block' (DataDependent)" in message
    assert "test_fuse.py" in message and "if x.sum() > 0:" in message
    assert "control flow" in message
    assert "traceable submodule" in message and "ptfast.nn.Conv2dReLUMaxPool2d" in message
    assert isinstance(info.value.__cause__, Exception)


def test_untraceable_root_and_fusing_a_traceable_part():
    with pytest.raises(ptfast.FuseError, match=r"the root module \(DataDependent\)"):
        ptfast.fuse(DataDependent())
    model = seeded(Wrapper)
    expected_stem = model.stem(torch.ones(1, 3, 8, 9, dtype=torch.float64))
    model.stem = ptfast.fuse(model.stem)  # the suggested workaround
    assert fused_calls(model.stem) == 1
    torch.testing.assert_close(model.stem(torch.ones(1, 3, 8, 9, dtype=torch.float64)), expected_stem)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ptfast.fuse(lambda x: x)


def test_branch_on_training_is_guarded():
    class Branchy(ReluBeforePool):
        def forward(self, x):
            x = super().forward(x)
            if self.training:
                x = x * 2
            return x

    model = seeded(Branchy)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    fused = ptfast.fuse(model.train())
    assert fused_calls(fused) == 1
    torch.testing.assert_close(fused(x), model(x))
    fused.eval()
    with pytest.raises(AssertionError, match=r"traced with the model.training=True.*ptfast.fuse\(model.eval\(\)\)"):
        fused(x)
    fused_eval = ptfast.fuse(model.eval())
    torch.testing.assert_close(fused_eval(x), model(x))
    assert any(n.target is operator.eq for n in fused_eval.graph.nodes)


def _copy_attr_as_in_torch_2_13(from_module: nn.Module, to_module: nn.Module, target: str) -> None:
    """torch 2.13's GraphModule copy of one attribute: every tensor becomes a *persistent* buffer
    (2.14 keeps a non-persistent buffer non-persistent)."""
    *prefix, field = target.split(".")
    for item in prefix:
        f, t = getattr(from_module, item), getattr(to_module, item, None)
        if f is t:
            return
        if t is None:
            t = nn.Module()
            setattr(to_module, item, t)
        from_module, to_module = f, t
    orig = getattr(from_module, field)
    if isinstance(orig, torch.Tensor) and not isinstance(orig, nn.Parameter):
        to_module.register_buffer(field, orig)
    else:
        setattr(to_module, field, orig)


@pytest.mark.parametrize("graph_module_copy", ["this torch", "torch 2.13"])
def test_copies_keep_non_persistent_buffers_and_tensor_attributes_out_of_the_state_dict(
    graph_module_copy, monkeypatch
):
    """deepcopy, pickle and fuse of a fused model: state_dict keys as the original's, whatever
    GraphModule's own attribute copying does (torch 2.13 made `scale` and `offset` persistent)."""
    import torch.fx.graph_module

    if graph_module_copy == "torch 2.13":
        monkeypatch.setattr(torch.fx.graph_module, "_copy_attr", _copy_attr_as_in_torch_2_13)

    class WithState(ReluBeforePool):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64), persistent=False)
            self.offset = torch.tensor(1.0, dtype=torch.float64)

        def forward(self, x):
            return super().forward(x) * self.scale + self.offset

    model = seeded(WithState)
    fused = ptfast.fuse(model)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    for clone in (fused, copy.deepcopy(fused), torch.load(_saved(fused), weights_only=False), ptfast.fuse(fused),
                  copy.deepcopy(copy.deepcopy(fused))):
        assert list(clone.state_dict()) == ["conv.weight", "conv.bias"]
        assert {"scale", "offset"} <= dict(clone.named_buffers()).keys()  # registered, so .to() moves them
        torch.testing.assert_close(clone(x), model(x))
        clone.load_state_dict(model.state_dict())  # strict
