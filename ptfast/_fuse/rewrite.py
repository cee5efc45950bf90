"""The graph rewrites of ``ptfast.fuse``: conv2d -> ReLU -> max_pool2d chains and log_softmax calls
become ptfast's fused operators; branches on ``training`` get a guard."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ptfast import functional
from ptfast._fuse.matchers import match_conv, match_dropout2d, match_log_softmax, match_pool, match_relu
from ptfast._fuse.runtime import check_dropout2d_chain_input

__all__ = ["fuse_chains", "fuse_log_softmax", "guard_training_branches"]


def fuse_chains(graph: fx.Graph, modules: dict[str, nn.Module], flags: dict[str, fx.Node]) -> int:
    """Rewrite every conv2d -> {ReLU, max_pool2d, optional Dropout2d} chain; return how many.

    ``flags`` maps "<module>.training" to the graph's reads of those flags.
    """
    count = 0
    for conv in list(graph.nodes):
        spec = match_conv(conv, modules)
        if spec is None:
            continue
        chain: list[fx.Node] = []
        pool = dropout = None
        relu = False
        value = conv
        while not (relu and pool is not None):
            if len(value.users) != 1:
                break
            user = next(iter(value.users))
            if not relu and match_relu(user, value, modules):
                relu = True
            elif pool is None and (found := match_pool(user, value, modules)) is not None:
                pool = found
            elif dropout is None and (found := match_dropout2d(user, value, modules)) is not None:
                dropout = (user, value, found)
            else:
                break
            chain.append(user)
            value = user
        if not (relu and pool is not None):
            continue

        with graph.inserting_before(conv):
            weight, bias = spec["weight"], spec["bias"]
            if isinstance(weight, str):
                weight = graph.get_attr(weight)
            if isinstance(bias, str):
                bias = graph.get_attr(bias)
            if dropout is not None:
                training = dropout[2]["training"]
                if isinstance(training, str):
                    training = flags[training] if training in flags else graph.get_attr(training)
                if training is not False:
                    graph.call_function(check_dropout2d_chain_input, (spec["input"], training))
            fused = graph.call_function(
                functional.conv2d_relu_max_pool2d,
                (spec["input"], weight, bias),
                dict(stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"],
                     groups=spec["groups"], **pool),
            )
        fused.meta = dict(conv.meta)
        last = chain[-1]
        if dropout is None:
            last.replace_all_uses_with(fused)
        else:
            # The dropout node stays where it was (its random draws keep their place among the
            # model's other random calls), now applied to the fused output.
            node, old_input, _ = dropout
            last.replace_all_uses_with(node)
            node.replace_input_with(old_input, fused)
        for node in reversed([conv, *chain]):
            if dropout is None or node is not dropout[0]:
                graph.erase_node(node)
        count += 1
    return count


def fuse_log_softmax(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    count = 0
    for node in list(graph.nodes):
        found = match_log_softmax(node, modules)
        if found is None:
            continue
        input, dim, dtype = found
        with graph.inserting_before(node):
            new = graph.call_function(
                functional.log_softmax, (input, dim), {} if dtype is None else {"dtype": dtype}
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def guard_training_branches(
    graph: fx.Graph, training_nodes: dict[fx.Node, bool], specialised: dict[fx.Node, str], name: str
) -> None:
    """Make the graph raise if a ``training`` flag it branched on at trace time is switched.

    ``training_nodes``: the graph's reads of ``training`` flags and their values at trace time;
    ``specialised``: those a Python branch depended on, and where that branch is.
    """
    for node, where in specialised.items():
        value = training_nodes[node]
        owner = node.target[: -len(".training")] if node.target != "training" else ""
        message = (
            f"ptfast.fuse: this fused {name} was traced with {owner or 'the model'}.training={value}, "
            f"because its forward branches on it ({where}); it cannot run with training={not value}. "
            f"Fuse the model again in that mode (ptfast.fuse(model.{'train()' if not value else 'eval()'}))."
        )
        with graph.inserting_after(node):
            check = graph.call_function(operator.eq, (node, value))
        with graph.inserting_after(check):
            graph.call_function(torch._assert, (check, message))
