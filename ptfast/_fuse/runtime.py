"""What ``ptfast.fuse``'s callers and the fused graphs meet at run time."""

from __future__ import annotations

import torch

__all__ = ["FuseError", "check_dropout2d_chain_input"]


class FuseError(RuntimeError):
    """``ptfast.fuse`` could not rewrite a model (in practice: torch.fx could not trace it)."""


def check_dropout2d_chain_input(input: torch.Tensor, training: bool) -> None:
    """Guard in front of a fused chain that contained a Dropout2d (see ptfast._fuse's docstring).

    `input`: the chain's input, which must be (N, C, H, W) while the dropout is in training mode.
    """
    if training and input.dim() != 4:
        raise RuntimeError(
            "ptfast.fuse: a fused conv2d -> Dropout2d -> ReLU -> max_pool2d chain needs a batched 4-D "
            f"input while the dropout is in training mode, got shape {tuple(input.shape)}: torch's "
            "dropout2d treats a 3-D input as (N, C, L) and that does not commute with pooling. "
            "Add a batch dimension, or use the unfused model."
        )
