"""How much of a model's matrix-product work its named quantizable ops carry.

One forward pass under ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of
every product (``mm``, ``bmm``, ``addmm``, ``baddbmm``, convolutions, SDPA kernels...)
per module (inclusive of children). The *captured* FLOPs are those counted inside
the quantizable ops of :func:`hawq.models.ops.quantizable_ops`; everything else is
*left out* and attributed to the innermost module that ran it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hawq.models.ops import quantizable_ops


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Kernels FlopCounterMode does not count by default (the CPU flash-attention kernel).
EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


@dataclass(frozen=True)
class LeftOut:
    """Product FLOPs that no quantizable op carries: where (module name, ``""`` = the
    root), which aten op, and how many FLOPs on the example inputs."""

    module: str
    op: str
    flops: int

    def __str__(self) -> str:
        return f"{self.op} in {self.module or '<root>'} ({self.flops} FLOPs)"


def _call(model: nn.Module, args: tuple, kwargs: dict):
    return model(*args, **kwargs)


@torch.enable_grad()
def count_flops(model: nn.Module, args: tuple, kwargs: dict) -> tuple[object, dict[str, dict]]:
    """Eval-mode forward under FlopCounterMode (train mode restored afterwards); grad
    stays enabled (a module called with a Parameter operand, ``x @ self.query``, breaks
    the mode's module tracker under no_grad) and the output is detached.

    Returns:
        ``(output, {module name: {aten op name: FLOPs}})`` with inclusive counts per
        module; the root is ``""`` (it holds the total).
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as counter:
            out = tree_map(
                lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                _call(model, args, kwargs),
            )
    finally:
        model.train(was_training)
    counts: dict[str, dict] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            name = ""
        elif "." in key:
            name = key.split(".", 1)[1]  # "<RootClass>.blocks.0.attn" -> "blocks.0.attn"
        else:
            continue  # the root module itself: same counts as Global
        counts[name] = {str(op).removeprefix("aten."): int(f) for op, f in ops.items() if f}
    return out, counts


def _parent(name: str, names: set[str]) -> str:
    while name:
        name = name.rpartition(".")[0]
        if name in names:
            return name
    return ""


def split_flops(model: nn.Module, counts: dict[str, dict]) -> tuple[int, int, list[LeftOut]]:
    """``(total, captured, left out)`` product FLOPs from :func:`count_flops` counts."""
    ops = list(quantizable_ops(model))
    total = sum(counts.get("", {}).values())
    captured = sum(sum(counts.get(n, {}).values()) for n in ops)
    inside = tuple(n + "." for n in ops)
    exclusive = {n: dict(c) for n, c in counts.items()}
    names = set(counts)
    for name, c in counts.items():
        if name:
            parent = exclusive[_parent(name, names)]
            for op, f in c.items():
                parent[op] = parent.get(op, 0) - f
    left = [
        LeftOut(n, op, f)
        for n, c in exclusive.items()
        for op, f in c.items()
        if f > 0 and n not in ops and not n.startswith(inside)
    ]
    return total, captured, sorted(left, key=lambda x: -x.flops)
