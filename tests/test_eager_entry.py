"""The two ways into the operators: ptfast._C's direct bindings for eager calls
on plain tensors, torch.ops for everything else (compilers, subclasses,
__torch_function__ modes). Both must reach the same operator with the same
results, autograd and errors, and each caller must get the one it needs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ptfast
from common_utils import block_inputs
from ptfast import _C

BLOCK_ARGS = ([1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [0, 0], False)


@pytest.fixture
def eager_calls(monkeypatch):
    """Counts the calls that take ptfast._C's direct bindings."""
    calls = {"log_softmax": 0, "block": 0}
    log_softmax, block = _C._log_softmax, _C._conv2d_relu_max_pool2d

    def counted_log_softmax(*args):
        calls["log_softmax"] += 1
        return log_softmax(*args)

    def counted_block(*args):
        calls["block"] += 1
        return block(*args)

    monkeypatch.setattr(_C, "_log_softmax", counted_log_softmax)
    monkeypatch.setattr(_C, "_conv2d_relu_max_pool2d", counted_block)
    return calls


class _RecordingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _LoggingTensor(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_entries_agree_forward_and_backward(dtype, eager_calls):
    x = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, 7, dtype=dtype)
    eager = ptfast.log_softmax(x, 1)
    boxed = torch.ops.ptfast.log_softmax(x, 1)
    assert eager_calls["log_softmax"] == 1
    assert torch.equal(eager, boxed)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (eager, boxed)))

    x, w, b = block_inputs(2, 3, 4, 9, 9, 3, 1, True, dtype)
    eager = ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    boxed = torch.ops.ptfast.conv2d_relu_max_pool2d(x, w, b, *BLOCK_ARGS)
    assert eager_calls["block"] == 1
    assert torch.equal(eager, boxed)
    grad = torch.randn_like(eager)
    for a, b_ in zip(torch.autograd.grad(eager, (x, w, b), grad), torch.autograd.grad(boxed, (x, w, b), grad)):
        assert torch.equal(a, b_)


def test_parameters_take_the_eager_entry(eager_calls):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x, _, _ = block_inputs(2, 3, 4, 9, 9, 3, 1, True, torch.float64)
    ptfast.conv2d_relu_max_pool2d(x, conv.weight, conv.bias, padding=1)
    ptfast.log_softmax(torch.nn.Parameter(torch.randn(3, 4)), 1)
    assert eager_calls == {"log_softmax": 1, "block": 1}


def test_torch_function_mode_sees_the_operators(eager_calls):
    x, w, b = block_inputs(2, 3, 4, 9, 9, 3, 1, True, torch.float64)
    with _RecordingMode() as mode:
        ptfast.log_softmax(x.detach(), 1)
        ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    assert "log_softmax" in mode.seen and "conv2d_relu_max_pool2d" in mode.seen
    assert eager_calls == {"log_softmax": 0, "block": 0}


def test_tensor_subclass_torch_function_sees_the_operators(eager_calls):
    _LoggingTensor.seen = []
    x = torch.randn(2, 3, 8, 8).as_subclass(_LoggingTensor)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    ptfast.log_softmax(x, 1)
    ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1)
    ptfast.conv2d_relu_max_pool2d(torch.randn(2, 3, 8, 8), w.as_subclass(_LoggingTensor), b, padding=1)
    assert _LoggingTensor.seen.count("log_softmax") == 1
    assert _LoggingTensor.seen.count("conv2d_relu_max_pool2d") == 2
    assert eager_calls == {"log_softmax": 0, "block": 0}


def test_torch_compile_traces_the_operators_in_one_graph(eager_calls):
    x, w, b = (t.detach() for t in block_inputs(2, 3, 4, 9, 9, 3, 1, True, torch.float32))

    def model(x):
        return ptfast.log_softmax(ptfast.conv2d_relu_max_pool2d(x, w, b, padding=1).flatten(1), 1)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))
    # The compiled call ran torch.ops; only the eager reference took the direct bindings.
    assert eager_calls == {"log_softmax": 1, "block": 1}


@pytest.mark.parametrize(
    "call",
    [
        lambda: ptfast.log_softmax(torch.ones(3, 4, dtype=torch.int32), 1),
        lambda: ptfast.log_softmax(torch.ones(3, 4), 2),
        lambda: ptfast.conv2d_relu_max_pool2d(torch.ones(1, 3, 8, 8), torch.ones(4, 2, 3, 3)),
        lambda: ptfast.conv2d_relu_max_pool2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3), torch.ones(5)),
    ],
    ids=["log_softmax dtype", "log_softmax dim", "block channels", "block bias"],
)
def test_errors_are_those_of_torch_ops(call, monkeypatch):
    with pytest.raises(Exception) as eager:
        call()
    monkeypatch.setattr(ptfast.functional, "_torch_function_mode_enabled", lambda: True)
    with pytest.raises(Exception) as boxed:
        call()
    assert type(eager.value) is type(boxed.value)
    assert str(eager.value) == str(boxed.value)
