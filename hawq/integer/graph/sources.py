"""Values from outside the computation: model inputs, integer ids, parameters and buffers.

A :class:`~.lower.Lowering` asks for them in a format (a demand): the model's float input
is read on the first quantized op's grid (its codes are the integer model's input), ids and
masks pass as they are with their index arithmetic replayed, and a parameter is quantized
into the demanded format once (onto the residual stream, a grid, or accumulator units for a
score bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from hawq.integer.graph.analyze import Unsupported, tensor_args, where

if TYPE_CHECKING:
    from hawq.integer.graph.lower import Lowering

INDEX_D = ("index",)
WIDE_D = ("wide",)
BIAS_LIMIT = 2**29  # |a score bias| in accumulator units: int32 headroom over any product


def placeholders(gm: fx.GraphModule, graph: fx.Graph) -> tuple[dict, list[str] | None]:
    """The new graph's inputs, one per model input: ``codes`` for a single input (the input
    grid's codes, or ids), else named by the keyword input; and the keyword names (None for
    a single input)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    single = len(inputs) == 1
    made = {n: graph.placeholder("codes" if single else str(n.target)) for n in inputs}
    return made, None if single else [str(n.target) for n in inputs]


def model_input(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    """The float model input, on the grid of the quantized op reading it (one input grid)."""
    if demand[0] != "codes":
        raise Unsupported(
            f"integer conversion: the model input reaches {demand[0]} before any quantized op"
        )
    if lo.grid_input not in (None, str(node.target)):
        raise Unsupported(
            f"integer conversion: two float model inputs ({lo.grid_input} and "
            f"{node.target}) reach quantized ops; one input quantizer allowed"
        )
    if lo.in_grid is not None and lo.in_grid != demand[1]:
        raise Unsupported(
            "integer conversion: the model input is read on two grids "
            f"({lo.in_grid} and {demand[1]}); one input quantizer allowed"
        )
    lo.in_grid, lo.grid_input = demand[1], str(node.target)
    return lo.placeholders[node]


def index_value(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    """An integer tensor (token ids, position ids, an attention mask) as it is: an input, a
    buffer, or index arithmetic replayed on them."""
    if demand != INDEX_D:
        raise Unsupported(
            f"integer conversion: {where(node)} (integer ids) is read as {demand[0]}; "
            "ids may only reach embeddings and index arithmetic"
        )
    if node.op == "placeholder":
        return lo.placeholders[node]
    if node.op == "get_attr":
        name = str(node.target).removeprefix("model.")
        return lo.const(node.meta["value"].detach().cpu().clone(), name)
    ins = set(tensor_args(node))
    return lo.graph.node_copy(node, lambda a: lo.emit(a, INDEX_D) if a in ins else lo.arg(a))


def parameter(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    """A parameter or float buffer quantized into ``demand``'s format, as a constant."""
    t = node.meta["value"].detach().double().cpu()
    name = str(node.target).removeprefix("model.")
    if demand == WIDE_D:
        lim = lo.r.limit
        q = torch.clamp(torch.round(t / lo.r.s_r), -lim, lim).to(torch.int32)
        return lo.const(q, name)
    if demand[0] == "codes":
        return lo.const(demand[1].quantize(t.float()), name + "_codes")
    if demand[0] == "bias":  # in accumulator units; -inf (a mask) to a large negative
        q = torch.round(torch.nan_to_num(t, neginf=-BIAS_LIMIT) / lo.bias_scale(demand[1]))
        return lo.const(torch.clamp(q, -BIAS_LIMIT, BIAS_LIMIT).to(torch.int32), name + "_b")
    raise Unsupported(f"integer conversion: {where(node)} is read as {demand[0]}")
