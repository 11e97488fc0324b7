"""Tie groups: ops that must share one activation setting because they read one tensor.

An integer kernel quantizes a tensor once; every op consuming it then sees the
same bits. :func:`shared_input_groups` finds such ops from one traced forward
pass: two ops are tied when an input operand of each is a view of the same
storage. In our ViT that ties ``attn.qk`` (reads q, k) with ``attn.av`` (reads
v): q, k and v are views of the ``qkv`` output. In a ResNet block with a conv
shortcut, ``conv1`` and the shortcut conv read the block input: HAWQ-V3 quantizes
that input once for both residual branches, which is the same rule. (Option-A
CIFAR ResNets have no shortcut conv, hence no ties.)

Groups are lists of op names in network order; user-given groups are merged
with derived ones (:func:`merge_groups`), so tie chains become one group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hawq.alloc.report import OPERANDS
from hawq.errors import HawqError, choices
from hawq.models.ops import op_kind, probe_ops


def shared_input_groups(
    model: nn.Module, input_size: tuple[int, ...], example: Any = None
) -> list[list[str]]:
    """Groups (size >= 2) of ops whose input operands share storage, in network order (one
    forward on zeros of ``input_size`` or on ``example`` inputs of any structure)."""
    readers: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # hold inputs so no storage is freed and reused mid-pass
    order: list[str] = []

    def record(name: str, m: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        if name not in order:
            order.append(name)
        for t in inputs[: len(OPERANDS[op_kind(m)])]:
            keep.append(t)
            ptr = t.untyped_storage().data_ptr()
            if name not in readers.setdefault(ptr, []):
                readers[ptr].append(name)

    probe_ops(model, record, input_size, example=example)
    return merge_groups([r for r in readers.values() if len(r) > 1], order)


def merge_groups(groups: Iterable[Iterable[str]], order: list[str]) -> list[list[str]]:
    """Union of overlapping groups (transitive), each sorted by ``order``; singletons dropped.

    Raises:
        HawqError: a group names an op not in ``order``.
    """
    pos = {n: i for i, n in enumerate(order)}
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for g in groups:
        g = list(g)
        unknown = [o for o in g if o not in pos]
        if unknown:
            raise HawqError(f"tie group names unknown op(s) {choices(unknown)}")
        for o in g[1:]:
            parent[find(o)] = find(g[0])
        find(g[0]) if g else None
    out: dict[str, list[str]] = {}
    for o in parent:
        out.setdefault(find(o), []).append(o)
    groups_out = [sorted(set(v), key=pos.__getitem__) for v in out.values() if len(set(v)) > 1]
    return sorted(groups_out, key=lambda v: pos[v[0]])
