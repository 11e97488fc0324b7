"""Bounded ``torch.compile`` of an integer model: compile the repeated block, not the graph.

Compiling ``forward_int`` whole hands Inductor one graph holding every block's int64
requantisation chains, integer GELU / softmax / LayerNorm; its compile time grows with depth
(on a CPU one ``IntLayerNorm`` took ~170 s and a whole tiny graph did not finish in 15 min,
issue 13). Regional compilation compiles each block's ``forward`` instead::

    for block in model.blocks: block.compile()

Blocks are compiled one at a time on the activations an eager pass gave them, and compiling
stops once ``budget_s`` has passed (the rest stay eager): the wall clock spent compiling is
bounded by the budget plus one block's compile. Blocks do not share graphs in general
(Dynamo guards on each block's Python constants, e.g. the integer GELU's, and ResNet stages
differ in shape), but each graph is one block's: small graphs compile in seconds, where the
whole-model graph's compile time grows much faster than its size. The stem, the final
LayerNorm and the head stay eager (one GEMM each). The result is bit-identical to eager:
integer ops are exact in any order.
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
    """Compile ``model.blocks`` in place, one at a time, within ``budget_s`` seconds.

    Args:
        model: an integer model with a ``blocks`` :class:`~torch.nn.ModuleList`.
        example: ``forward_int`` input (int8 codes) whose activations warm each block.
        budget_s: stop compiling further blocks once this many seconds have passed (the
            first block is always compiled).
        backend: ``torch.compile`` backend (``"eager"`` traces with Dynamo only, for tests).
        **kwargs: passed to ``torch.compile`` (``mode=...``, ``dynamic=...``).

    Returns:
        ``blocks``, ``compiled`` (how many), ``seconds`` (compile wall clock), ``graphs``
        (graphs Dynamo built meanwhile).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"compile_blocks: {type(model).__name__} has no blocks to compile")
    inputs: list[tuple] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args)) for b in blocks]
    try:
        with torch.no_grad():
            model.forward_int(example)
    finally:
        for h in hooks:
            h.remove()
    graphs0, t0, done = compiled_graph_count(), time.perf_counter(), 0
    for block, args in zip(blocks, inputs):
        if done and time.perf_counter() - t0 >= budget_s:
            break
        block.compile(backend=backend, **kwargs)
        with torch.no_grad():
            block(*args)  # compiles now
        done += 1
    return {"blocks": len(blocks), "compiled": done, "seconds": time.perf_counter() - t0,
            "graphs": compiled_graph_count() - graphs0}  # fmt: skip


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process (``torch._dynamo.utils.counters``)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
