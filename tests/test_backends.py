"""ptfast.backends.cpu.conv_block: the setting, its context manager, the environment variable and the rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ptfast
from common_utils import block_inputs

cpu = ptfast.backends.cpu


def _meta_block(c: int, oc: int, h: int, k: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(2, c, h, h, device="meta"), torch.empty(oc, c // groups, k, k, device="meta")


def test_default_is_auto():
    assert cpu.conv_block == "auto"


@pytest.mark.parametrize("value", ["direct", "vendor", "auto"])
def test_flags_sets_and_restores(value):
    with cpu.flags(conv_block=value):
        assert cpu.conv_block == value
    assert cpu.conv_block == "auto"


def test_flags_restores_after_an_exception():
    with pytest.raises(KeyError):
        with cpu.flags(conv_block="vendor"):
            raise KeyError("boom")
    assert cpu.conv_block == "auto"


@pytest.mark.parametrize("value", ["oneDNN", "", "Direct", 1, None])
def test_bad_value_names_the_setting(value):
    with pytest.raises(ValueError, match="`conv_block` must be 'auto', 'direct' or 'vendor'"):
        cpu.conv_block = value
    assert cpu.conv_block == "auto"


def _import_with_environment(value: str) -> subprocess.CompletedProcess:
    code = "import ptfast; print(ptfast.backends.cpu.conv_block)"
    env = {**os.environ, "PTFAST_CPU_CONV_BLOCK": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_sets_the_initial_value():
    result = _import_with_environment("vendor")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "vendor"


def test_bad_environment_variable_names_it():
    result = _import_with_environment("fastest")
    assert result.returncode != 0
    assert "PTFAST_CPU_CONV_BLOCK must be 'auto', 'direct' or 'vendor', got 'fastest'" in result.stderr


# (id, (in channels, out channels, size, kernel), op keyword arguments, the paths auto takes: forward, backward)
POOL3 = dict(pool_kernel_size=3, pool_stride=2)
RULE = [
    ("mnist_block1", (1, 10, 28, 5), {}, ("direct", "direct")),
    ("mnist_block2", (10, 20, 12, 5), {}, ("direct", "direct")),
    ("lenet_block2", (6, 16, 14, 5), {}, ("direct", "direct")),
    ("cifar_3_32", (3, 32, 32, 3), dict(padding=1), ("direct", "direct")),
    ("cifar_32_64", (32, 64, 16, 3), dict(padding=1), ("direct", "direct")),
    ("vgg_3_64", (3, 64, 224, 3), dict(padding=1), ("direct", "direct")),
    ("products_319", (319, 8, 6, 1), {}, ("direct", "direct")),
    ("products_320", (320, 8, 6, 1), {}, ("vendor", "vendor")),
    ("squeezenet_conv1", (3, 64, 224, 3), dict(stride=2, ceil_mode=True, **POOL3), ("direct", "vendor")),
    ("overlapping_rows_only", (3, 8, 20, 3), dict(pool_kernel_size=(3, 2), pool_stride=(2, 2)), ("direct", "vendor")),
    ("alexnet_conv1", (3, 64, 224, 11), dict(stride=4, padding=2, **POOL3), ("vendor", "vendor")),
    ("alexnet_conv2", (64, 192, 27, 5), dict(padding=2, **POOL3), ("vendor", "vendor")),
    ("vgg_64_128", (64, 128, 112, 3), dict(padding=1), ("vendor", "vendor")),
    ("vgg_512_512", (512, 512, 14, 3), dict(padding=1), ("vendor", "vendor")),
]


@pytest.mark.parametrize("dims,kwargs,expected", [r[1:] for r in RULE], ids=[r[0] for r in RULE])
def test_auto_rule(dims, kwargs, expected):
    """The documented rule: vendor from 320 products (in channels per group x kernel taps) per conv
    output; below that direct, except the backward of overlapping pooling windows."""
    x, w = _meta_block(*dims)
    assert (cpu.conv_block_path(x, w, **kwargs), cpu.conv_block_path(x, w, backward=True, **kwargs)) == expected


def test_rule_counts_products_per_group():
    x, w = _meta_block(640, 8, 6, 1, groups=2)  # 320 products per output
    assert cpu.conv_block_path(x, w, groups=2) == "vendor"
    x, w = _meta_block(640, 8, 6, 1, groups=4)  # 160
    assert cpu.conv_block_path(x, w, groups=4) == "direct"


@pytest.mark.parametrize("forced", ["direct", "vendor"])
def test_forced_path_overrides_the_rule(forced):
    x, w = _meta_block(512, 512, 14, 3)
    with cpu.flags(conv_block=forced):
        assert cpu.conv_block_path(x, w) == cpu.conv_block_path(x, w, backward=True) == forced


def test_conv_block_path_checks_its_arguments():
    x, w = _meta_block(4, 8, 6, 3)
    with pytest.raises(RuntimeError, match="`input` has 5 channels"):
        cpu.conv_block_path(torch.empty(2, 5, 6, 6, device="meta"), w)
    with pytest.raises(RuntimeError, match="`pool_kernel_size`"):
        cpu.conv_block_path(x, w, pool_kernel_size=9)
    with pytest.raises(TypeError, match="`stride` must be an int or a pair of ints"):
        cpu.conv_block_path(x, w, stride=(1, 2, 3))


def test_conv_block_path_takes_what_the_op_takes():
    """Unbatched input and padding='same' as ptfast.conv2d_relu_max_pool2d accepts them."""
    x, w = _meta_block(320, 8, 6, 1)
    assert cpu.conv_block_path(x[0], w, padding="same") == "vendor"


def _forward_and_gradients(x, w, b, **kwargs):
    out = ptfast.conv2d_relu_max_pool2d(x, w, b, **kwargs)
    return [out, *torch.autograd.grad(out, (x, w, b), torch.ones_like(out))]


@pytest.mark.parametrize("channels,pool,expected", [
    (8, 2, ("direct", "direct")), (8, 3, ("direct", "vendor")), (40, 2, ("vendor", "vendor")),
])
def test_auto_runs_the_paths_the_rule_names(channels, pool, expected):
    """auto gives bitwise the forced paths' results, forward from one and gradients from the other
    where the rule says so; the two paths' roundings differ, so this tells them apart."""
    x, w, b = block_inputs(4, channels, 16, 12, 12, 3, 1, True, torch.float32)
    x = (x.detach() + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).requires_grad_()
    kwargs = dict(padding=1, pool_kernel_size=pool, pool_stride=2)
    assert (cpu.conv_block_path(x, w, **kwargs), cpu.conv_block_path(x, w, backward=True, **kwargs)) == expected
    auto = _forward_and_gradients(x, w, b, **kwargs)
    results = {}
    for path in ("direct", "vendor"):
        with cpu.flags(conv_block=path):
            results[path] = _forward_and_gradients(x, w, b, **kwargs)
    forward, backward = expected
    assert torch.equal(auto[0], results[forward][0])
    assert all(torch.equal(a, e) for a, e in zip(auto[1:], results[backward][1:]))
    assert not all(torch.equal(a, e) for a, e in zip(auto[1:], results["vendor" if backward == "direct" else "direct"][1:]))


@pytest.mark.parametrize("path", ["direct", "vendor"])
@pytest.mark.parametrize("kwargs,bad_code", [
    ({}, 5),  # a 2x2 window has codes 1..4
    ({}, 255),
    (dict(pool_kernel_size=3, pool_stride=2, ceil_mode=True), 9),  # the last window's third column lies past the plane
    (dict(pool_kernel_size=16, pool_stride=1), -3),  # 256 taps: int32 codes
], ids=["beyond_the_window", "far_beyond", "outside_the_conv_output", "negative_int32"])
def test_backward_rejects_codes_that_name_no_tap(kwargs, bad_code, path):
    """Both paths index by the codes: a corrupt one (the raw op) is an error, never an out-of-bounds access."""
    x, w, b = block_inputs(1, 2, 3, 18, 18, 3, 1, True, torch.float64)
    kw = dict(pool_kernel_size=2, pool_stride=None, ceil_mode=False) | kwargs
    pool = [kw["pool_kernel_size"]] * 2
    args = ([1, 1], [0, 0], [1, 1], 1, pool, [kw["pool_stride"] or kw["pool_kernel_size"]] * 2, [0, 0], kw["ceil_mode"])
    out, codes = torch.ops.ptfast._conv2d_relu_max_pool2d_with_codes(x.detach(), w.detach(), b.detach(), *args)
    assert codes.dtype == (torch.int32 if bad_code < 0 else torch.uint8)
    codes = codes.clone()
    codes[0, 0, -1, -1] = bad_code
    with cpu.flags(conv_block=path), pytest.raises(RuntimeError, match="`codes` holds a code"):
        torch.ops.ptfast._conv2d_relu_max_pool2d_backward(
            torch.ones_like(out), x.detach(), w.detach(), codes, *args, [True, True, True]
        )
