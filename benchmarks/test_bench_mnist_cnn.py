"""The tutorial's MNIST CNN end to end: MnistCNN(fused=True) vs MnistCNN(fused=False), eager and compiled.

One SGD training step (lr 0.01, momentum 0.5, nll_loss, train mode) and an
inference forward (eval mode, no_grad). Batches: ptfast.apps.bench.cases.mnist_batches.
Run: pytest benchmarks/test_bench_mnist_cnn.py
"""

import pytest

pytestmark = pytest.mark.slow

FAMILY = "mnist_cnn"


def test_mnist_cnn(case, implementation, device, measure):
    measure(case, implementation, device)
