"""``hessian.json``: the curvature artifact the allocation stage reads, owned here: its
schema (:data:`SCHEMA`), the writer (:func:`curvature_report`, :func:`write_hessian_report`),
the validator (:func:`validate`) and the typed reader (:func:`read_hessian` ->
:class:`HessianReport` of :class:`OpCurvature`); every stage reads it through the reader.

Schema 1 (ops in network order)::

    {"schema": 1, "model": str, "checkpoint": str,
     "estimator": "sandwich"|"hutchpp"|"hutchinson",
     "backend": "double_backward"|"func", "seed": int, "dtype": str, "batches": int,
     "batch_size": int, "wall_s": float,
     "ops": {name: {"kind": "linear"|"conv2d"|"matmul", "numel": int, "macs": int,
                    "trace": float|null, "trace_stderr": float|null, "trace_samples": int|null,
                    "eigenvalues": [float]|null, "eig_residuals": [float]|null,
                    "eig_iterations": int|null,
                    "act_trace": {operand: float}, "act_trace_stderr": {operand: float},
                    "act_numel": {operand: int}}}}

Written since curvature engine v2 (optional for readers, absent in older files):
top-level ``"trace_block": "weight"|"weight+bias"`` (what ``trace`` and
``eigenvalues`` span; per op ``"trace_numel"`` counts those elements, while
``numel`` stays weight + bias, the size the cost models use),
``"eig_which": "LA"|"LM"`` (``eigenvalues`` largest algebraic first, i.e.
``eigenvalues[0]`` is lambda_max, or largest magnitude first),
``"sketch"``, ``"trace_rel_stderr"`` (aggregate, the stop statistic),
``"backend_requested"`` (``auto`` or a backend) and ``"backend_choice"`` (how ``backend``
was chosen: never by timing); per op
``"lambda_max"`` (with ``eig_which`` LA), ``"eig_converged": [bool]`` (true
residual ``||Hv - lambda v|| / |lambda|`` <= ``tol``) and ``"trace_undetermined"``
(``|trace| < 2 trace_stderr``: the sign is not resolved;
:mod:`hawq.alloc.sensitivity` says what allocation does with it). Files older
than v2 span weight + bias (``trace_numel`` = ``numel``) and list eigenvalues by
magnitude.

``macs`` are per image; ``numel`` is 0 for a MatMul; ``act_*`` are keyed ``x``
(Linear/Conv2d) or ``a``/``b`` (MatMul) and are per-sample averages. Further
top-level keys (timings, density summaries) may be present; readers ignore them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawq.errors import HawqError
from hawq.io import read_json, write_json

log = logging.getLogger("hawq")

SCHEMA = 1
TOP_KEYS = (
    "schema",
    "model",
    "checkpoint",
    "estimator",
    "backend",
    "seed",
    "dtype",
    "batches",
    "batch_size",
    "wall_s",
    "ops",
)
OP_KEYS = (
    "kind",
    "numel",
    "macs",
    "trace",
    "trace_stderr",
    "trace_samples",
    "eigenvalues",
    "eig_residuals",
    "eig_iterations",
    "act_trace",
    "act_trace_stderr",
    "act_numel",
)
OPERANDS = {"linear": ("x",), "conv2d": ("x",), "matmul": ("a", "b")}


def _finite_or_none(x: float | None) -> float | None:
    """JSON has no inf/nan: map them to null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def op_entry(
    kind: str,
    numel: int,
    macs: int,
    trace: Any = None,
    eig: Any = None,
    act: dict[str, Any] | None = None,
    trace_numel: int | None = None,
) -> dict:
    """One op's record from a :class:`TraceEstimate`, an :class:`EigenResult` and operand
    estimates (any of them may be ``None``)."""
    act = act or {}
    extra: dict[str, Any] = {}
    if trace_numel is not None:
        extra["trace_numel"] = int(trace_numel)
    if eig:
        extra["eig_converged"] = [bool(c) for c in eig.converged]
        if eig.which == "LA":
            extra["lambda_max"] = float(eig.values[0])
    if trace:
        extra["trace_undetermined"] = bool(trace.sign_undetermined)
    return {
        "kind": kind,
        "numel": int(numel),
        "macs": int(macs),
        "trace": _finite_or_none(trace.mean) if trace else None,
        "trace_stderr": _finite_or_none(trace.stderr) if trace else None,
        "trace_samples": int(trace.n_samples) if trace else None,
        "eigenvalues": [float(v) for v in eig.values] if eig else None,
        "eig_residuals": [_finite_or_none(r) for r in eig.residuals] if eig else None,
        "eig_iterations": int(eig.iterations) if eig else None,
        "act_trace": {k: _finite_or_none(e.mean) for k, e in act.items()},
        "act_trace_stderr": {k: _finite_or_none(e.stderr) for k, e in act.items()},
        "act_numel": {k: int(e.numel) for k, e in act.items()},
        **extra,
    }


def validate(report: Any, source: str = "hessian report") -> dict:
    """Check the schema-1 structure; raise :class:`HawqError` naming the first problem."""

    def fail(msg: str) -> None:
        raise HawqError(f"invalid {source}: {msg}")

    if not isinstance(report, dict):
        fail("not a JSON object")
    if report.get("schema") != SCHEMA:
        fail(f"schema {report.get('schema')!r}, expected {SCHEMA}")
    for key in TOP_KEYS:
        if key not in report:
            fail(f"missing key {key!r}")
    if report["estimator"] not in ("sandwich", "hutchinson", "hutchpp", "fisher"):
        fail(f"estimator {report['estimator']!r}")
    if report["backend"] not in ("double_backward", "func", "per_sample_grad"):
        fail(f"backend {report['backend']!r}")
    ops = report["ops"]
    if not isinstance(ops, dict) or not ops:
        fail("'ops' must be a non-empty object")
    for name, e in ops.items():
        if not isinstance(e, dict):
            fail(f"op {name!r} is not an object")
        for key in OP_KEYS:
            if key not in e:
                fail(f"op {name!r} lacks {key!r}")
        if e["kind"] not in OPERANDS:
            fail(f"op {name!r} has kind {e['kind']!r}")
        if e["kind"] == "matmul" and e["numel"] != 0:
            fail(f"matmul op {name!r} has numel {e['numel']}")
        for key in ("act_trace", "act_trace_stderr", "act_numel"):
            if e[key] and set(e[key]) != set(OPERANDS[e["kind"]]):
                fail(
                    f"op {name!r} {key} keys {sorted(e[key])}, expected {list(OPERANDS[e['kind']])}"
                )
        for key, value in _numbers(e):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                fail(f"op {name!r} {key}={value!r}; allowed: a finite number or null")
    return report


def _numbers(e: dict) -> list[tuple[str, Any]]:
    """``(key, value)`` of every numeric field of an op entry (lists and operand maps
    flattened): traces, stderrs, eigenvalues, residuals, sizes."""
    out: list[tuple[str, Any]] = []
    for key in ("numel", "macs", "trace", "trace_stderr", "trace_samples", "eig_iterations"):
        out.append((key, e.get(key)))
    for key in ("eigenvalues", "eig_residuals"):
        values = e.get(key)
        if values is not None and not isinstance(values, list):
            out.append((key, values))
        for i, v in enumerate(values or []):
            out.append((f"{key}[{i}]", v))
    for key in ("act_trace", "act_trace_stderr", "act_numel"):
        values = e.get(key)
        if values is not None and not isinstance(values, dict):
            out.append((key, values))
        for operand, v in (values or {}).items():
            out.append((f"{key}.{operand}", v))
    return out


def write_hessian_report(path: str | Path, report: dict) -> Path:
    """Validate and write ``report`` atomically."""
    return write_json(path, validate(report, str(path)))


def load_hessian_report(path: str | Path) -> dict:
    """Read and validate ``hessian.json``; a missing or malformed file is a :class:`HawqError`."""
    path = Path(path)
    if not path.is_file():
        raise HawqError(f"missing Hessian report {path}; run the 'hessian' stage first")
    return validate(read_json(path), str(path))


def curvature_report(
    inventory: list,
    traces: dict | None = None,
    acts: dict | None = None,
    eigs: dict | None = None,
    trace_numel: dict[str, int] | None = None,
    **meta: Any,
) -> dict:
    """A validated ``hessian.json`` mapping from the library's results: the public path
    from :func:`~hawq.hessian.api.layer_traces` / ``activation_traces`` /
    ``layer_eigenpairs`` (or :mod:`hawq.hessian.fisher`) to
    :func:`hawq.alloc.allocate` (``allocate(parse_hessian(report), ...)``) or to a file
    (:func:`write_hessian_report`).

    Args:
        inventory: :func:`hawq.models.ops.op_inventory` of the model (names, kinds, sizes,
            MACs per image), in network order.
        traces: op -> :class:`~hawq.hessian.hutchinson.TraceEstimate` of its weight block.
        acts: op -> operand -> ``TraceEstimate`` (``x``, or ``a``/``b`` of a MatMul).
        eigs: op -> ``EigenResult``.
        trace_numel: op -> elements its trace spans (default: each estimate's ``numel``).
        meta: top-level keys; ``estimator``, ``backend``, ``seed``, ``dtype``, ``batches``,
            ``batch_size``, ``wall_s``, ``model``, ``checkpoint`` default to ``None``-like
            values a reader accepts (``estimator`` ``hutchinson``, ``backend``
            ``double_backward``).
    """
    traces, acts, eigs = traces or {}, acts or {}, eigs or {}
    numel = trace_numel or {n: e.numel for n, e in traces.items()}
    defaults = {
        "model": None,
        "checkpoint": None,
        "estimator": "hutchinson",
        "backend": "double_backward",
        "seed": 0,
        "dtype": "float32",
        "batches": 1,
        "batch_size": 0,
        "wall_s": 0.0,
        "trace_block": "weight",
    }
    ops = {
        info.name: op_entry(
            info.kind,
            0 if info.kind == "matmul" else info.params,
            info.macs,
            traces.get(info.name),
            eigs.get(info.name),
            acts.get(info.name),
            trace_numel=numel.get(info.name, 0),
        )
        for info in inventory
    }
    return validate({"schema": SCHEMA, **defaults, **meta, "ops": ops}, "curvature report")


# ---------------------------------------------------------------- the typed reader

KINDS = ("linear", "conv2d", "matmul")


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
    eigenvalues: tuple[float, ...] = ()  # as listed (eig_which LA: lambda_max first)


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
    if schema != SCHEMA:
        raise HawqError(f"{where}: schema {schema!r} is not supported; allowed: {SCHEMA}")
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
            eigenvalues=tuple(float(v) for v in eig or ()),
        )
    meta = {k: v for k, v in d.items() if k != "ops"}
    return HessianReport(where, meta, ops)


def read_hessian(path: str | Path) -> HessianReport:
    """Read ``path`` (``hessian.json``): the schema check of :func:`load_hessian_report`,
    then the typed view (:func:`parse_hessian`): the one way stages read the file."""
    return parse_hessian(load_hessian_report(path), where=str(path))
