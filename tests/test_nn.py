"""ptfast.nn modules: drop-in for their torch.nn counterparts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptfast
from common_utils import native_block


def _pair_of_modules(seed=0, **kwargs):
    torch.manual_seed(seed)
    native = nn.Conv2d(3, 5, 3, **{k: v for k, v in kwargs.items() if not k.startswith("pool") and k != "ceil_mode"})
    torch.manual_seed(seed)
    fused = ptfast.nn.Conv2dReLUMaxPool2d(3, 5, 3, **kwargs)
    return native, fused


def test_parameters_initialised_like_conv2d():
    native, fused = _pair_of_modules(padding=1, groups=1, bias=True)
    assert torch.equal(native.weight, fused.weight) and torch.equal(native.bias, fused.bias)
    assert isinstance(fused, nn.Conv2d)


def test_state_dict_loads_both_ways():
    native, fused = _pair_of_modules(seed=1)
    _, other = _pair_of_modules(seed=2)
    other.load_state_dict(native.state_dict())
    assert torch.equal(other.weight, native.weight)
    native.load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(padding="same"), dict(stride=2, padding=1, pool_kernel_size=3, pool_stride=1, pool_padding=1),
     dict(bias=False, ceil_mode=True), dict(dilation=2, pool_kernel_size=(2, 1))],
)
def test_module_matches_native_composite(kwargs):
    _, fused = _pair_of_modules(**kwargs)
    fused = fused.double()
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64)
    ref = native_block(x, fused.weight, fused.bias, fused.stride, fused.padding, fused.dilation, fused.groups,
                       fused.pool_kernel_size, fused.pool_stride, fused.pool_padding, fused.ceil_mode)
    torch.testing.assert_close(fused(x), ref)


def test_unbatched_input_like_conv2d():
    _, fused = _pair_of_modules(padding=1)
    x = torch.randn(3, 10, 10)
    out = fused(x)
    assert out.shape == (5, 5, 5)
    torch.testing.assert_close(out, fused(x.unsqueeze(0)).squeeze(0))


def test_device_and_dtype_arguments():
    m = ptfast.nn.Conv2dReLUMaxPool2d(1, 2, 3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"


def test_repr_shows_pooling():
    _, fused = _pair_of_modules(pool_kernel_size=3, pool_stride=2)
    assert "pool_kernel_size=(3, 3)" in repr(fused) and "pool_stride=(2, 2)" in repr(fused)


def test_log_softmax_module():
    m = ptfast.nn.LogSoftmax(dim=1)
    assert isinstance(m, nn.LogSoftmax)
    x = torch.randn(4, 10)
    torch.testing.assert_close(m(x), nn.LogSoftmax(dim=1)(x))


def test_tutorial_cnn_with_ptfast_modules_trains_like_native():
    """The tutorial's CNN (section 5.3) built from ptfast modules matches the native net step for step."""

    class Native(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
            self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
            self.fc1 = nn.Linear(320, 50)
            self.fc2 = nn.Linear(50, 10)

        def forward(self, x):
            x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
            x = torch.relu(torch.max_pool2d(self.conv2(x), 2))
            x = torch.relu(self.fc1(x.flatten(1)))
            return torch.log_softmax(self.fc2(x), dim=1)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ptfast.nn.Conv2dReLUMaxPool2d(1, 10, kernel_size=5)
            self.conv2 = ptfast.nn.Conv2dReLUMaxPool2d(10, 20, kernel_size=5)
            self.fc1 = nn.Linear(320, 50)
            self.fc2 = nn.Linear(50, 10)
            self.log_softmax = ptfast.nn.LogSoftmax(dim=1)

        def forward(self, x):
            x = self.conv2(self.conv1(x))
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.log_softmax(self.fc2(x))

    torch.manual_seed(0)
    native = Native().double()
    fused = Fused().double()
    fused.load_state_dict(native.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5) for m in (native, fused)]
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(8, 1, 28, 28, dtype=torch.float64, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        losses = []
        for model, opt in zip((native, fused), opts):
            opt.zero_grad()
            loss = nn.functional.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-9, abs=1e-12)
    for p_native, p_fused in zip(native.parameters(), fused.parameters()):
        torch.testing.assert_close(p_native, p_fused)
