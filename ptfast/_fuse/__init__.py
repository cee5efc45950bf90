"""``ptfast.fuse``: rewrite a model to run on ptfast's fused operators, with torch.fx.

    runtime.py      FuseError, and the check fused graphs call at run time
    matchers.py     the patterns: which graph nodes are which op, read from public torch.fx only
    rewrite.py      the graph rewrites built on the matchers
    fx_private.py   what leans on torch.fx internals: the tracer, and the fused GraphModule's
                    construction, deep copy and pickling

``fuse(model)`` traces ``model.forward`` with torch.fx and rewrites

* every ``conv2d -> ReLU -> max_pool2d`` chain (ReLU before or after the pool,
  an optional ``Dropout2d`` anywhere before the last of the two) into
  ``ptfast.conv2d_relu_max_pool2d``, the dropout (same module or call, same
  ``p``, same ``training``) moved after the fused op, and
* every ``log_softmax`` with an explicit ``dim`` into ``ptfast.log_softmax``,

and leaves every other node as it was. The result is a ``torch.fx.GraphModule``
over a deep copy of the model: the same submodules under the same names (so
``state_dict()`` keys, ``named_parameters()`` names and their order are the
original's), none of them shared with the original.

Why the rewrite is exact:

* ``relu(max_pool(y)) == max_pool(relu(y))`` (both monotone), so either order is
  one fused op;
* ``Dropout2d`` scales each (n, c) channel by 0 or 1/(1-p) >= 0, which commutes
  with ReLU and max-pooling; its mask has shape (N, C, 1, 1) whatever H and W,
  so drawn after the fused op it takes the same random numbers in the same
  order. (A 3-D input is different: torch's dropout2d then drops per (C, H)
  row, which does not commute with pooling, so the fused graph raises if a
  chain with a Dropout2d gets one while that dropout is in training mode.)

``training`` is kept dynamic: ``self.training`` read in a traced ``forward``
(e.g. the tutorial's ``F.dropout(x, training=self.training)``) becomes a read of
the fused module's own flag, so ``.train()`` / ``.eval()`` work on the result as
on the original. Only a Python branch on ``self.training`` (``if
self.training:``) is fixed at the mode the model was fused in; the fused graph
then checks the flag and raises if it is switched.
"""

from __future__ import annotations

import copy

from torch import nn

from ptfast._fuse.fx_private import FusedGraphModule, trace
from ptfast._fuse.rewrite import fuse_chains, fuse_log_softmax, guard_training_branches
from ptfast._fuse.runtime import FuseError, check_dropout2d_chain_input

__all__ = ["fuse", "FuseError", "FusedGraphModule", "check_dropout2d_chain_input"]


def fuse(module: nn.Module) -> FusedGraphModule:
    """A copy of ``module`` whose conv2d -> ReLU -> max_pool2d chains and log_softmax run on ptfast.

    Matched (each op in module or functional form; everything else is left as it is):

    * ``nn.Conv2d`` (exactly that class, ``padding_mode='zeros'``, no hooks) or ``F.conv2d`` /
      ``torch.conv2d`` with constant stride/padding/dilation/groups, whose output feeds only
    * a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants too) and a
      max-pool (``nn.MaxPool2d``, ``F.max_pool2d``, ``torch.max_pool2d``, dilation 1, no indices)
      in either order, with optionally an ``nn.Dropout2d`` / ``F.dropout2d`` before the last of
      them; each intermediate value used by nothing else. The chain becomes one
      ``ptfast.conv2d_relu_max_pool2d`` call followed by the same dropout module or call;
    * ``F.log_softmax`` / ``torch.log_softmax`` / ``torch.special.log_softmax`` /
      ``x.log_softmax`` / ``nn.LogSoftmax`` with an explicit int ``dim`` become
      ``ptfast.log_softmax``; implicit-dim calls stay native.

    Not matched (stay native): a conv whose output is used twice, other conv classes or padding
    modes, a BatchNorm or anything else inside the chain, dilated or index-returning pools,
    modules with hooks, and anything inside ptfast.nn modules (already fused).

    The result is a ``torch.fx.GraphModule`` built on a deep copy of ``module``: it shares no
    parameters, buffers or submodules with ``module`` (which is not modified), and it has the
    same submodules under the same names, so ``state_dict()`` keys, ``named_parameters()``
    names and their order are ``module``'s and state dicts (and optimizer state dicts) load
    both ways. Build the optimizer from the fused model's parameters. Dropout masks come from
    the same random calls in the same order, so with the same seed the fused and the original
    model train identically (up to floating-point rounding). It follows ``.train()`` /
    ``.eval()`` like ``module``. The fused ops support the dtypes and devices ptfast does
    (float32, float64, bfloat16 and float16; under autocast as native). ``fuse`` of a fused model returns an equivalent copy.

    Raises:
        FuseError: torch.fx cannot trace ``module`` (e.g. control flow on tensor values); the
            message says in which submodule and on which line.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"ptfast.fuse: expected an nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    try:
        model = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001
        raise FuseError(
            f"ptfast.fuse: cannot deep-copy {name} ({type(exc).__name__}: {exc}); fuse works on a copy "
            "so that the original model is left as it is"
        ) from exc
    graph, tracer = trace(model, name)
    modules = dict(model.named_modules())
    fuse_chains(graph, modules, {node.target: node for node in tracer.training_nodes})
    fuse_log_softmax(graph, modules)
    guard_training_branches(graph, tracer.training_nodes, tracer.specialised, name)
    for node in tracer.training_nodes:
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    return FusedGraphModule.build(model, graph, name)
