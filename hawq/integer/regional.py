"""Bounded ``torch.compile`` of an integer model: compile its steps, not the whole graph.

Compiling ``forward_int`` whole hands Inductor one graph holding every block's int64
requantisation chains, integer GELU / softmax / LayerNorm; its compile time grows with depth
(on a CPU one ``IntLayerNorm`` took ~170 s and a whole tiny graph did not finish in 15 min,
issue 13). Regional compilation compiles each region's ``forward`` instead: the integer
steps of an :class:`~hawq.integer.graph.convert.IntegerGraph` (a fused attention, a
LayerNorm, a linear with its epilogue), or a model's ``blocks``::

    for region in regions(model): region.compile()

Regions are compiled one at a time, in execution order, on the inputs an eager pass gave
them, and compiling stops once ``budget_s`` has passed (the rest stay eager): the wall clock
spent compiling is bounded by the budget plus one region's compile. Each graph is one
region's: small graphs compile in seconds, where the whole-model graph's compile time
grows much faster than its size. The result is bit-identical to eager: integer ops are
exact in any order.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from hawq.integer.layers import IntegerModel

Tensor = torch.Tensor


def compile_blocks(
    model: IntegerModel,
    example: Tensor,
    budget_s: float = math.inf,
    backend: str = "inductor",
    **kwargs,
) -> dict[str, float]:
    """Compile the :func:`regions` of ``model`` in place, one at a time, within ``budget_s``.

    Args:
        model: an integer model with ``steps`` (or a ``blocks`` ModuleList).
        example: ``forward_int`` input (int8 codes) whose activations warm each block.
        budget_s: stop compiling further blocks once this many seconds have passed (the
            first block is always compiled).
        backend: ``torch.compile`` backend (``"eager"`` traces with Dynamo only, for tests).
        **kwargs: passed to ``torch.compile`` (``mode=...``, ``dynamic=...``).

    Returns:
        ``regions``, ``compiled`` (how many), ``seconds`` (compile wall clock), ``graphs``
        (graphs Dynamo built meanwhile).
    """
    blocks = regions(model)
    if not blocks:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no regions to compile")
    inputs: list[tuple] = []
    order: list[nn.Module] = []

    def record(m: nn.Module, args: tuple) -> None:
        if m not in order:
            order.append(m)
            inputs.append(args)

    hooks = [b.register_forward_pre_hook(record) for b in blocks]
    try:
        with torch.no_grad():
            model.forward_int(example)
    finally:
        for h in hooks:
            h.remove()
    graphs0, t0, done = compiled_graph_count(), time.perf_counter(), 0
    for block, args in zip(order, inputs):
        if done and time.perf_counter() - t0 >= budget_s:
            break
        block.compile(backend=backend, **kwargs)
        with torch.no_grad():
            block(*args)  # compiles now
        done += 1
    return {
        "regions": len(blocks),
        "compiled": done,
        "seconds": time.perf_counter() - t0,
        "graphs": compiled_graph_count() - graphs0,
    }


def regions(model: nn.Module) -> list[nn.Module]:
    """The compile regions: the integer steps of a graph model, else its ``blocks``."""
    steps = getattr(model, "steps", None)
    if isinstance(steps, nn.Module):
        return list(steps.children())
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process (``torch._dynamo.utils.counters``)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
