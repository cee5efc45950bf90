"""ptfast.conv2d_relu_max_pool2d vs conv2d + relu + max_pool2d, eager and compiled: inference and forward+backward.

Shapes: ptfast.apps.bench.cases.block_shapes. Run: pytest benchmarks/test_bench_conv2d_relu_max_pool2d.py
"""

import pytest

pytestmark = pytest.mark.slow

FAMILY = "conv2d_relu_max_pool2d"


def test_conv2d_relu_max_pool2d(case, implementation, device, measure):
    measure(case, implementation, device)
