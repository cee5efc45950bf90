"""ptfast.log_softmax vs F.log_softmax, eager and compiled: inference and forward+backward.

Shapes: ptfast.apps.bench.cases.log_softmax_shapes. Run: pytest benchmarks/test_bench_log_softmax.py
"""

import pytest

pytestmark = pytest.mark.slow

FAMILY = "log_softmax"


def test_log_softmax(case, implementation, device, measure):
    measure(case, implementation, device)
