"""Hypothesis strategies shared by the tests (a plain module beside common_utils.py, which stays
importable without hypothesis: the install checks run some tests with pytest alone)."""

from __future__ import annotations

from hypothesis import assume
from hypothesis import strategies as st

from ptfast._shapes import conv_output_size, pool_output_size


@st.composite
def block_configs(draw):
    """A random valid (shape overrides, op keyword arguments, seed) for grid_inputs."""
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
