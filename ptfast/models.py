"""Ready-made models.

``MnistCNN`` is the MNIST network of the PyTorch tutorial (section 5.3 of the
tutorial this project follows), with its two conv -> max_pool2d -> ReLU blocks
and its log_softmax on ptfast's fused operators.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ptfast import functional
from ptfast import nn as ptnn
from ptfast._fuse import check_dropout2d_chain_input

__all__ = ["MnistCNN"]


class MnistCNN(nn.Module):
    """The tutorial's MNIST CNN; ``fused=True`` runs it on ptfast's fused ops.

    Shapes: input (N, 1, 28, 28) -> output (N, 10) log-probabilities (also
    (1, 28, 28) -> (1, 10), as the tutorial's ``x.view(-1, 320)`` allows).

    The submodules are the tutorial's ``Net``'s, with the same names and
    parameter shapes: ``conv1`` (1 -> 10, 5x5), ``conv2`` (10 -> 20, 5x5),
    ``conv2_drop`` (``nn.Dropout2d()``), ``fc1`` (320 -> 50), ``fc2`` (50 -> 10),
    created in the same order, so with the same seed both variants (and the
    tutorial's ``Net``) start from the same parameters, and their state dicts
    load into each other.

    * ``fused=False`` is exactly the tutorial's ``Net``: the same ops in the same
      order, the same dropout calls.
    * ``fused=True`` (default): ``conv1`` and ``conv2`` are
      ``ptfast.nn.Conv2dReLUMaxPool2d`` (conv + ReLU + 2x2 max-pool in one op),
      ``conv2_drop`` is applied to the fused ``conv2`` block's output (a
      channel mask commutes with ReLU and max-pooling, and it is drawn with the
      same shape, so it takes the same random numbers), and the output is
      ``ptfast.log_softmax``. With the same seed it computes and trains like
      ``fused=False`` up to floating-point rounding. (Except for unbatched
      (1, 28, 28) input in training mode, which it refuses: torch's Dropout2d
      then drops (C, H) rows, which does not commute with the pooling.)
    """

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.conv1 = ptnn.Conv2dReLUMaxPool2d(1, 10, kernel_size=5, pool_kernel_size=2)
            self.conv2 = ptnn.Conv2dReLUMaxPool2d(10, 20, kernel_size=5, pool_kernel_size=2)
        else:
            self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
            self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            x = self.conv1(x)
            check_dropout2d_chain_input(x, self.conv2_drop.training)
            x = self.conv2_drop(self.conv2(x))
        else:
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        if self.fused:
            return functional.log_softmax(x, dim=1)
        return F.log_softmax(x, dim=1)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
