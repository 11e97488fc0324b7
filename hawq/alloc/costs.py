"""Cost models of one op at one candidate setting; totals over ops are sums.

For op ``i`` with ``P_i`` parameters (weight + bias), ``M_i`` multiply-accumulates
per image and operand bits ``(w, a)`` (a matmul's operands are both ``a``; a
floating-point operand counts 32 bits):

* size:       ``P_i * w / 8 / 2^20`` MB (only the quantizable ops' parameters);
* BOPs:       ``M_i * w * a`` bit operations per image (totals in G = 1e9 BOPs);
* latency:    ``T_i(setting)`` microseconds from a measured table (:class:`LatencyTable`);
* avg_bits:   ``omega_i * b_i / sum_j omega_j`` with ``b_i = (w + a) / 2`` (matmul: ``a``) and
  weights ``omega_i = M_i`` (``by="macs"``), ``P_i`` (``"params"``, weight bits only) or 1
  (``"ops"``); the total is the weighted average bit width;
* int4_share: ``M_i [max(w, a) <= 4] / sum_j M_j``: the share of multiplications that
  run at INT4 or below (the seed study's metric).

Each cost is defined as the exact rational number these formulas give on the integer
MACs, parameters and bits and the latency table's floats (:func:`exact_costs`); the
float arrays the ILP solver reads (:func:`cost_arrays`) are those rationals correctly
rounded. Budgets are checked against the exact totals (issue 29): a plan whose cost is
exactly the budget, e.g. all 8-bit at ``avg_bits=8``, meets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawq.alloc.candidates import FP_BITS, Candidate
from hawq.errors import HawqError, choices
from hawq.io import read_json

AVG_BY = ("macs", "params", "ops")
MB = 2**20  # bytes
GIGA = 1e9  # BOPs budgets and totals are in G bit-ops per image


@dataclass(frozen=True)
class OpCost:
    """What the cost models need to know about one op."""

    name: str
    kind: str  # linear | conv2d | matmul
    params: int
    macs: int
    shape: str | None = None  # GEMM shape key for latency tables (see :func:`gemm_shape`)


def size_mb(op: OpCost, c: Candidate) -> float:
    """``P * w / 8 / 2^20``; a matmul has no parameters."""
    if op.kind == "matmul":
        return 0.0
    w = FP_BITS if c.w_bits is None else c.w_bits
    return op.params * w / 8 / MB


def bops(op: OpCost, c: Candidate) -> float:
    """``M * w * a``."""
    w, a = c.operand_bits(op.kind)
    return float(op.macs) * w * a


def int4_macs(op: OpCost, c: Candidate) -> float:
    """``M`` when both operands have at most 4 bits, else 0."""
    return float(op.macs) if c.max_bits(op.kind) <= 4 else 0.0


def mean_bits(op: OpCost, c: Candidate, by: str) -> float:
    """The op's bit width for the average: weight bits for ``by="params"``, else ``(w+a)/2``."""
    w, a = c.operand_bits(op.kind)
    if by == "params":
        return float(w)
    return a if op.kind == "matmul" else (w + a) / 2


def avg_weight(op: OpCost, by: str) -> int:
    """``omega_i`` of the average: MACs, parameters (a matmul has none) or 1."""
    if by not in AVG_BY:
        raise HawqError(f"alloc.avg_bits_by={by!r} is invalid; allowed: {choices(AVG_BY)}")
    return {"macs": op.macs, "params": 0 if op.kind == "matmul" else op.params, "ops": 1}[by]


class LatencyTable:
    """Measured latency per op and setting, in microseconds.

    JSON layout (``by_op`` wins over ``by_shape``)::

        {"unit": "us",
         "by_op":    {"blocks.0.attn.qkv": {"w4a4": 10.5, "w8a8": 17.0}},
         "by_shape": {"linear:65x512x1536": {"w4a4": 10.5, ...}}}

    Setting keys are :attr:`Candidate.key`; shape keys come from :func:`gemm_shape`.
    """

    def __init__(
        self,
        by_op: Mapping[str, Mapping[str, float]] | None = None,
        by_shape: Mapping[str, Mapping[str, float]] | None = None,
        source: str = "latency table",
    ) -> None:
        self.by_op = {k: dict(v) for k, v in (by_op or {}).items()}
        self.by_shape = {k: dict(v) for k, v in (by_shape or {}).items()}
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        d = read_json(path)
        if not isinstance(d, dict) or not ({"by_op", "by_shape"} & set(d)):
            raise HawqError(f"{path}: not a latency table (needs by_op and/or by_shape)")
        if d.get("unit", "us") != "us":
            raise HawqError(f"{path}: unit {d['unit']!r} is not supported; allowed: us")
        return cls(d.get("by_op"), d.get("by_shape"), source=str(path))

    def lookup(self, op: OpCost, c: Candidate) -> float:
        for table, key in ((self.by_op, op.name), (self.by_shape, op.shape)):
            if key is not None and key in table and c.key in table[key]:
                return float(table[key][c.key])
        raise HawqError(
            f"{self.source}: no latency for op {op.name} (shape {op.shape}) at setting {c.key}"
        )


def exact_size_mb(op: OpCost, c: Candidate) -> Fraction:
    """:func:`size_mb` exactly."""
    w = FP_BITS if c.w_bits is None else c.w_bits
    return Fraction(0 if op.kind == "matmul" else op.params * w, 8 * MB)


def exact_bops(op: OpCost, c: Candidate) -> Fraction:
    """:func:`bops` in G bit-ops, exactly."""
    w, a = c.operand_bits(op.kind)
    return Fraction(op.macs * w * a, int(GIGA))


def exact_costs(
    ops: list[OpCost],
    candidates: list[list[Candidate]],
    latency: LatencyTable | None = None,
    avg_bits_by: str = "macs",
) -> dict[str, list[list[Fraction]]]:
    """Cost kind -> per op, the exact rational cost of each of its candidates.

    Units as :func:`cost_arrays`; a latency is its table float taken exactly.
    """
    total_w = sum(avg_weight(op, avg_bits_by) for op in ops) or 1
    total_m = sum(op.macs for op in ops) or 1
    kinds = ("avg_bits", "size_mb", "bops", "int4_share")
    kinds += ("latency_us",) if latency is not None else ()
    out: dict[str, list[list[Fraction]]] = {k: [] for k in kinds}
    for op, cands in zip(ops, candidates, strict=True):
        w = Fraction(avg_weight(op, avg_bits_by), total_w)
        out["avg_bits"].append([w * Fraction(mean_bits(op, c, avg_bits_by)) for c in cands])
        out["size_mb"].append([exact_size_mb(op, c) for c in cands])
        out["bops"].append([exact_bops(op, c) for c in cands])
        out["int4_share"].append(
            [Fraction(op.macs * (c.max_bits(op.kind) <= 4), total_m) for c in cands]
        )
        if latency is not None:
            out["latency_us"].append([Fraction(latency.lookup(op, c)) for c in cands])
    return out


def cost_arrays(
    ops: list[OpCost],
    candidates: list[list[Candidate]],
    latency: LatencyTable | None = None,
    avg_bits_by: str = "macs",
) -> dict[str, list[np.ndarray]]:
    """Cost kind -> per op, the cost of each of its candidates (sums give the totals):
    :func:`exact_costs` correctly rounded to floats.

    Units: ``avg_bits`` bits, ``size_mb`` MB, ``bops`` GBOPs per image, ``latency_us``
    microseconds, ``int4_share`` a fraction of all MACs.
    """
    exact = exact_costs(ops, candidates, latency, avg_bits_by)
    return {k: [np.array([float(v) for v in row]) for row in rows] for k, rows in exact.items()}


def gemm_shape(module: nn.Module, kind: str, inputs: tuple[Any, ...], output: torch.Tensor) -> str:
    """``kind:MxKxN`` of the product per image (matmul: ``batch*M`` rows over heads).

    linear: M tokens, K in_features, N out_features; conv2d (im2col): M output
    pixels, K ``C_in/groups * kh * kw``, N ``C_out``; matmul ``a @ b``: M rows of
    ``a`` times the leading (head) dims, K, N columns of ``b``.
    """
    b = output.shape[0]
    if kind == "linear":
        k = inputs[0].shape[-1]
        return f"linear:{output.numel() // (b * output.shape[-1])}x{k}x{output.shape[-1]}"
    if kind == "conv2d":
        w = module.weight  # (C_out, C_in/g, kh, kw)
        m = output.shape[-2] * output.shape[-1]
        return f"conv2d:{m}x{w.shape[1] * w.shape[2] * w.shape[3]}x{w.shape[0]}"
    a = inputs[0]
    return f"matmul:{a.numel() // (b * a.shape[-1])}x{a.shape[-1]}x{output.shape[-1]}"


def op_shapes(model: nn.Module, input_size: tuple[int, ...], example: Any = None) -> dict[str, str]:
    """Op name -> :func:`gemm_shape` key, from one forward pass on a zero image pair (or on
    ``example`` inputs of any structure)."""
    from hawq.models.ops import op_kind, probe_ops

    shapes: dict[str, str] = {}

    def record(name: str, m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        shapes.setdefault(name, gemm_shape(m, op_kind(m), inputs, output))

    probe_ops(model, record, input_size, batch=2, example=example)
    return shapes
