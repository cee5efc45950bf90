"""Helpers shared by the tests: the native reference, test data, comparisons, IDX files.

A plain module (as torchvision's test/common_utils.py), imported by name; the
fixtures are in conftest.py, which pytest loads by itself.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ptfast
from ptfast.apps.mnist.data import FILES

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA_SKIP)]


def native_block(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode=False):
    """The composite ptfast.conv2d_relu_max_pool2d must reproduce."""
    conv = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return F.max_pool2d(F.relu(conv), pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def make_data(shape, dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random test data.

    float64: standard normal. float32: dyadic values (multiples of 1/8 in
    [-2, 2]) scaled by `scale` (a power of two), so that conv sums are exact in
    float32 whatever the summation order: ptfast and native then agree
    exactly, ties in a pooling window included, and a near-tie can never make
    the two pick different arg-maxes.
    """
    if dtype == torch.float64:
        return torch.randn(shape, dtype=dtype, generator=generator) * scale
    values = torch.randint(-16, 17, shape, generator=generator).to(dtype) / 8
    return values * scale


def block_inputs(
    n: int, c: int, oc: int, h: int, w: int, kernel, groups: int, bias: bool, dtype, seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input, weight, bias) on `device` as leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = make_data((n, c, h, w), dtype, g).to(device).requires_grad_()
    wt = make_data((oc, c // groups, kh, kw), dtype, g, scale=0.25).to(device).requires_grad_()
    b = make_data((oc,), dtype, g).to(device).requires_grad_() if bias else None
    return x, wt, b


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def assert_block_matches_native(
    x, w, b, kwargs: dict[str, Any], *, check_grad: bool = True, seed: int = 1,
    block: Callable[..., torch.Tensor] = ptfast.conv2d_relu_max_pool2d,
):
    """Forward and every gradient of ``block`` (ptfast's op unless given) vs the native composite."""
    out = block(x, w, b, **kwargs)
    ref = native_block(x, w, b, **kwargs)
    tol = tolerances(x.dtype)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)
    if not check_grad:
        return
    g = torch.Generator().manual_seed(seed)
    grad = make_data(ref.shape, x.dtype, g).to(x.device)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    for name, a, e in zip(["input", "weight", "bias"], got, want):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m, name=name: f"grad {name}: {m}", **tol)


BASE = dict(n=2, c=3, oc=4, h=10, w=9, kernel=3, groups=1, bias=True)

# The fused block's verification grid: (id, shape overrides of BASE, op keyword arguments).
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
    ("pool_kernel3_kernel5", dict(h=16, w=15, kernel=5), dict(pool_kernel_size=3, pool_stride=2)),
    ("pool_kernel3_kernel_2x3", dict(h=14, w=14, kernel=(2, 3)), dict(pool_kernel_size=3, pool_stride=2, pool_padding=1)),
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


def grid_inputs(shape_overrides: dict[str, Any], dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """(input, weight, bias) for BASE updated by a GRID entry's shape overrides."""
    cfg = {**BASE, **shape_overrides}
    return block_inputs(cfg["n"], cfg["c"], cfg["oc"], cfg["h"], cfg["w"], cfg["kernel"], cfg["groups"],
                        cfg["bias"], dtype, seed, device)



EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module (not run: its main() is behind ``if __name__ == "__main__"``)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# IDX type codes by dtype, written out from the format's definition rather than taken from the
# reader, so that a round trip checks the reader against the specification.
_IDX_CODES = {torch.uint8: 0x08, torch.int8: 0x09, torch.int16: 0x0B, torch.int32: 0x0C,
              torch.float32: 0x0D, torch.float64: 0x0E}


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, *, compress: bool | None = None) -> Path:
    """Write `tensor` as an IDX file (gzip when `compress`, or when the name ends in .gz)."""
    path = Path(path)
    if tensor.dtype not in _IDX_CODES:
        raise ValueError(f"IDX cannot store {tensor.dtype}")
    t = tensor.detach().cpu().contiguous()
    header = bytes([0, 0, _IDX_CODES[t.dtype], t.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    body = t.view(-1).view(torch.uint8)
    if t.element_size() > 1 and sys.byteorder == "little":
        body = body.view(-1, t.element_size()).flip(-1)  # IDX values are big-endian
    payload = header + (body.contiguous().numpy().tobytes() if body.numel() else b"")
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def write_dataset(
    folder: str | os.PathLike,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    compress: bool = True,
) -> dict[str, Path]:
    """Write a dataset's four IDX files into `folder` under the standard names.

    Shapes: images (N, H, W), labels (N,); both stored as uint8.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = (train[0], train[1], test[0], test[1])
    return {
        key: write_idx(folder / (f"{name}.gz" if compress else name), t.to(torch.uint8), compress=compress)
        for (key, name), t in zip(FILES.items(), tensors)
    }


def tiny_dataset(folder: Path, n_train: int = 192, n_test: int = 50) -> Path:
    """A tiny MNIST-shaped dataset in `folder`. Class k: a bright bar at row 2k plus noise, so a few
    steps already learn something."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, k in enumerate(labels.tolist()):
            images[i, 2 * k + 2 : 2 * k + 5, 4:24] = 250
        return images.to(torch.uint8), labels.to(torch.uint8)

    write_dataset(folder, make(n_train), make(n_test))
    return folder
