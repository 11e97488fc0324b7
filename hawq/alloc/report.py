"""Read and validate ``hessian.json`` (the Hessian stage's per-op curvature report).

Only what allocation needs is checked: each op's ``kind``, ``numel``, ``macs``,
``trace``, ``eigenvalues`` and the activation traces ``act_trace`` /
``act_numel`` keyed by operand (``x`` for linear/conv, ``a`` and ``b`` for
matmul). A missing key is a one-line :class:`HawqError` naming file, op and key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.errors import HawqError

log = logging.getLogger("hawq")
KINDS = ("linear", "conv2d", "matmul")
OPERANDS = {"linear": ("x",), "conv2d": ("x",), "matmul": ("a", "b")}


@dataclass(frozen=True)
class OpCurvature:
    """One op's entry of ``hessian.json``."""

    name: str
    kind: str
    numel: int  # weight + bias elements (0 for matmul): the size costs
    macs: int  # per image
    trace: float | None  # Tr(H_W) over the op's weight (weight + bias before v2)
    top_eig: float | None  # lambda_max: largest algebraic eigenvalue of that block
    act_trace: dict[str, float]  # operand -> per-sample Tr(H_a)
    act_numel: dict[str, int]  # operand -> elements per sample
    trace_numel: int | None = None  # elements the trace spans (None: numel)
    trace_stderr: float | None = None  # standard error of trace (None: unknown)
    act_trace_stderr: dict[str, float] = field(default_factory=dict)  # operand -> stderr


@dataclass
class HessianReport:
    """``hessian.json``: provenance + op entries in network order."""

    path: str
    meta: dict[str, Any]
    ops: dict[str, OpCurvature]


def _need(d: dict, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise HawqError(f"{where}: missing key {key!r}")
    return d[key]


def parse_hessian(d: dict[str, Any], where: str = "hessian.json") -> HessianReport:
    """Validate a ``hessian.json`` mapping (see module docstring)."""
    schema = _need(d, "schema", where)
    if schema != 1:
        raise HawqError(f"{where}: schema {schema!r} is not supported; allowed: 1")
    which = d.get("eig_which")
    if which not in (None, "LA", "LM"):
        raise HawqError(f"{where}: eig_which {which!r} is invalid; allowed: LA, LM")
    if which != "LA" and any(
        (e or {}).get("eigenvalues") for e in (d.get("ops") or {}).values() if isinstance(e, dict)
    ):
        log.warning(
            "%s: eigenvalues are ordered by magnitude (eig_which %s): lambda_max is "
            "taken as the largest listed value, which misses it when every listed "
            "value is negative; rerun the hessian stage (eig_which=LA)",
            where,
            which,
        )
    ops_d = _need(d, "ops", where)
    if not isinstance(ops_d, dict) or not ops_d:
        raise HawqError(f"{where}: 'ops' must be a non-empty mapping of op name -> entry")
    ops = {}
    for name, e in ops_d.items():
        at = f"{where}: op {name}"
        kind = _need(e, "kind", at)
        if kind not in KINDS:
            raise HawqError(f"{at}: kind {kind!r} is invalid; allowed: {', '.join(KINDS)}")
        act_trace, act_numel = _need(e, "act_trace", at), _need(e, "act_numel", at)
        for operand in OPERANDS[kind]:
            for key, d_ in (("act_trace", act_trace), ("act_numel", act_numel)):
                if not isinstance(d_, dict) or d_.get(operand) is None:
                    raise HawqError(
                        f"{at}: {key}.{operand} is missing or null (the "
                        "activation sensitivity needs it)"
                    )
        eig = e.get("eigenvalues")
        trace = _need(e, "trace", at)
        if kind != "matmul" and trace is None and not eig:
            raise HawqError(f"{at}: needs a weight 'trace' or 'eigenvalues' (both are null)")
        ops[name] = OpCurvature(
            name=name,
            kind=kind,
            numel=int(_need(e, "numel", at)),
            macs=int(_need(e, "macs", at)),
            trace=None if trace is None else float(trace),
            top_eig=float(max(eig)) if eig else None,
            act_trace={k: float(act_trace[k]) for k in OPERANDS[kind]},
            act_numel={k: int(act_numel[k]) for k in OPERANDS[kind]},
            trace_numel=None if e.get("trace_numel") is None else int(e["trace_numel"]),
            trace_stderr=None if e.get("trace_stderr") is None else float(e["trace_stderr"]),
            act_trace_stderr={
                k: float(v) for k, v in (e.get("act_trace_stderr") or {}).items() if v is not None
            },
        )
    meta = {k: v for k, v in d.items() if k != "ops"}
    return HessianReport(where, meta, ops)


def read_hessian(path: str | Path) -> HessianReport:
    """Read ``path`` (``hessian.json``): the schema check of
    :func:`hawq.hessian.load_hessian_report`, then what allocation needs
    (:func:`parse_hessian`)."""
    from hawq.hessian.report import load_hessian_report

    return parse_hessian(load_hessian_report(path), where=str(path))


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
