"""The tutorial's network and a training run, shared by the tests.

`Net` is section 5.3 of ../shared/seed/pytorch-tutorial-zh.md, verbatim, as
examples/mnist_cnn.py writes it (its one definition in the repository): the
tests hold ptfast.fuse, ptfast.models.MnistCNN and ptfast-mnist's saved state
dicts to it exactly as the tutorial wrote it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common_utils import load_example

Net = load_example("mnist_cnn").Net

# 50 SGD steps (lr 0.01, momentum 0.5, batch 16): the fused kernels round
# differently from native conv2d, so losses agree to rounding, not bit for bit.
# Measured worst relative loss difference: ~2e-16 (float64), ~2e-7 (float32);
# the bounds leave room for other CPUs' kernels.
TRAJECTORY_TOL = {torch.float64: dict(rel=1e-9, param_atol=1e-9), torch.float32: dict(rel=1e-4, param_atol=1e-4)}


def train_losses(model: nn.Module, dtype: torch.dtype, steps: int = 50) -> tuple[list[float], nn.Module]:
    """Losses of `steps` SGD steps on seeded random data, with seeded dropout masks."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks
    model.train()
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 1, 28, 28, dtype=dtype, generator=data)
        y = torch.randint(0, 10, (16,), generator=data)
        opt.zero_grad()
        loss = F.nll_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model
