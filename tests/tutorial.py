"""The tutorial's network and a training run, shared by the tests.

`Net` is section 5.3 of ../shared/seed/pytorch-tutorial-zh.md, verbatim: the
tests hold ptfast.fuse, ptfast.models.MnistCNN and ptfast-mnist's saved state
dicts to it exactly as the tutorial wrote it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# 50 SGD steps (lr 0.01, momentum 0.5, batch 16): the fused kernels round
# differently from native conv2d, so losses agree to rounding, not bit for bit.
# Measured worst relative loss difference: ~2e-16 (float64), ~2e-7 (float32);
# the bounds leave room for other CPUs' kernels.
TRAJECTORY_TOL = {torch.float64: dict(rel=1e-9, param_atol=1e-9), torch.float32: dict(rel=1e-4, param_atol=1e-4)}


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


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
