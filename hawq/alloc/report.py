"""``hessian.json`` as allocation reads it (the format and its typed reader live in
:mod:`hawq.hessian.report`; re-exported here), and synthetic reports for tests and
benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawq.hessian.report import (  # noqa: F401 - the reader, re-exported for allocation
    KINDS,
    OPERANDS,
    HessianReport,
    OpCurvature,
    parse_hessian,
    read_hessian,
)


def synthetic_report(
    model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), seed: int = 0
) -> dict[str, Any]:
    """A ``hessian.json`` mapping for ``model`` with random positive curvature (log-uniform
    over 4 decades), for tests and benchmarks: true op names, kinds, numel, MACs and
    operand sizes; traces/eigenvalues are made up."""
    from hawq.models.ops import op_inventory, op_kind, probe_ops

    numel: dict[str, dict[str, int]] = {}

    def record(name: str, m: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        keys = OPERANDS[op_kind(m)]
        numel[name] = {k: t[0].numel() for k, t in zip(keys, inputs, strict=False)}

    probe_ops(model, record, input_size)
    g = torch.Generator().manual_seed(seed)

    def draw() -> float:
        return float(10 ** (4 * torch.rand((), generator=g) - 2))

    ops = {}
    for info in op_inventory(model, input_size):
        trace = None if info.kind == "matmul" else draw() * info.params / 100
        acts = numel[info.name]
        ops[info.name] = {
            "kind": info.kind,
            "numel": 0 if info.kind == "matmul" else info.params,
            "macs": info.macs,
            "trace": trace,
            "trace_stderr": None,
            "trace_samples": None,
            "eigenvalues": None if trace is None else [trace / 10],
            "eig_residuals": None,
            "eig_iterations": None,
            "act_trace": {k: draw() for k in acts},
            "act_trace_stderr": {k: 0.0 for k in acts},
            "act_numel": acts,
        }
    return {
        "schema": 1,
        "model": type(model).__name__,
        "checkpoint": None,
        "estimator": "hutchinson",
        "backend": "func",
        "synthetic": True,
        "seed": seed,
        "dtype": "float32",
        "batches": 0,
        "batch_size": 0,
        "wall_s": 0.0,
        "eig_which": "LA",
        "ops": ops,
    }
