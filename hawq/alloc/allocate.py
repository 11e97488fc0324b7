"""From ``hessian.json`` (+ model and calibration data) to an exact mixed-precision plan.

:func:`build_problem` turns the curvature report into an ILP instance (candidates
per op, pins, ties, sensitivities, costs); :func:`allocate` solves it and returns
the :class:`~hawq.quant.plan.Plan` with the provenance that goes into ``bits.yaml``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from hawq.alloc.candidates import Candidate, op_candidates, parse_candidates
from hawq.alloc.costs import LatencyTable, OpCost, exact_costs, op_shapes
from hawq.alloc.exact import solve
from hawq.alloc.ilp import Problem, Solution
from hawq.alloc.report import HessianReport
from hawq.alloc.sensitivity import (
    ACT_METHODS,
    METHODS,
    SETTINGS,
    activation_errors,
    hawq_sensitivity,
    random_sensitivity,
    tie_level,
    uniform_sensitivity,
    weight_errors,
)
from hawq.alloc.ties import merge_groups, shared_input_groups
from hawq.errors import HawqError, choices
from hawq.quant.bn_fold import find_conv_bn_pairs
from hawq.quant.plan import OpSetting, Plan


@dataclass
class Allocation:
    """A solved allocation: the plan, the instance it came from and its provenance."""

    problem: Problem
    solution: Solution
    plan: Plan
    meta: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, Candidate]:
        return self.solution.chosen(self.problem)

    @property
    def op_sensitivity(self) -> dict[str, float]:
        """Predicted sensitivity of each op at its chosen setting."""
        p, s = self.problem, self.solution
        return {n: float(p.sens[i][c]) for i, (n, c) in enumerate(zip(p.ops, s.index, strict=True))}


def resolve_pins(
    ops: list[str],
    pins: Mapping[str, Any] | None = None,
    first: Any = None,
    last: Any = None,
) -> dict[str, Candidate]:
    """Op name -> pinned candidate; ``first`` / ``last`` pin the first / last op."""
    out: dict[str, Candidate] = {}
    for name, entry in (pins or {}).items():
        if name not in ops:
            raise HawqError(f"alloc.pins names unknown op {name!r}; ops: {choices(ops)}")
        out[name] = Candidate.parse(entry, where=f"alloc.pins.{name}")
    if first is not None:
        out[ops[0]] = Candidate.parse(first, where="alloc.pin_first")
    if last is not None:
        out[ops[-1]] = Candidate.parse(last, where="alloc.pin_last")
    return out


def choices_per_op(
    report: HessianReport, candidates: Iterable[Any], pins: Mapping[str, Candidate]
) -> list[list[Candidate]]:
    """Each op's candidates (matmul duplicates merged); a pinned op has just its pin."""
    cands = parse_candidates(candidates)
    out = []
    for name, curv in report.ops.items():
        if name in pins:
            out.append([pins[name].for_kind(curv.kind)])
        else:
            out.append(op_candidates(curv.kind, cands))
    return out


def sensitivities(
    method: str,
    report: HessianReport,
    cands: list[list[Candidate]],
    model: nn.Module | None = None,
    calib_batches: Iterable | None = None,
    max_batches: int = 4,
    base: OpSetting | None = None,
    seed: int = 0,
    images: int = 32,
    rel_se: float = 0.05,
    fold_bn: bool = True,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Sensitivity arrays per op for ``method`` (not ``measured``: pass those in), + timings.

    Errors come from the deployed quantizer (:mod:`hawq.alloc.quant_error`); activation
    errors (not for ``hawq_v3``, which is weight-only) from one forward pass over
    ``images`` images of the first ``max_batches`` batches, more when the estimate is
    not yet within ``rel_se``. ``fold_bn``: convs followed by a BatchNorm quantize the
    folded weight (as :func:`hawq.quant.quantize_` with ``fold_bn``).
    """
    if method not in METHODS or method == "measured":
        raise HawqError(
            f"sensitivities: method {method!r}; allowed: "
            f"{choices(m for m in METHODS if m != 'measured')} "
            "(measured drops are passed in)"
        )
    kinds = [c.kind for c in report.ops.values()]
    if method == "uniform":
        return uniform_sensitivity(kinds, cands), {}
    if method == "random":
        return random_sensitivity(kinds, cands, seed), {}
    needs_acts = method in ACT_METHODS
    if model is None or (needs_acts and calib_batches is None):
        raise HawqError(
            f"{method} needs the model" + (" and calibration batches" if needs_acts else "")
        )
    base = base or OpSetting()
    modules = dict(model.named_modules())
    missing = [n for n in report.ops if n not in modules]
    if missing:
        raise HawqError(f"{report.path} names op(s) not in the model: {choices(missing)}")
    t0 = time.perf_counter()
    op_cands = {n: (c.kind, cs) for (n, c), cs in zip(report.ops.items(), cands, strict=True)}
    info: dict[str, float] = {}
    if needs_acts:
        batches = itertools.islice(iter(calib_batches), max_batches)
        a_err, info = activation_errors(
            model, batches, op_cands, base, images=images, max_images=10**9, rel_se=rel_se
        )
    else:
        a_err = {n: {} for n in report.ops}
    t1 = time.perf_counter()
    bn_of = find_conv_bn_pairs(model) if fold_bn else {}
    out = []
    for (name, curv), cs in zip(report.ops.items(), cands, strict=True):
        module = None if curv.kind == "matmul" else modules[name]
        bn = modules[bn_of[name]] if name in bn_of else None
        w_err = weight_errors(module, curv.kind, cs, base, bn, name)
        out.append(hawq_sensitivity(curv, cs, w_err, a_err[name], method))
    timings = {"calibration_s": t1 - t0, "weight_error_s": time.perf_counter() - t1}
    return out, {**timings, **{f"calibration_{k}": v for k, v in info.items()}}


def op_costs(
    report: HessianReport,
    model: nn.Module | None,
    input_size: tuple[int, ...],
    example: Any = None,
) -> list:
    """:class:`OpCost` per op (GEMM shapes need ``model``)."""
    shapes = op_shapes(model, input_size, example) if model is not None else {}
    return [OpCost(n, c.kind, c.numel, c.macs, shapes.get(n)) for n, c in report.ops.items()]


def build_problem(
    report: HessianReport,
    cands: list[list[Candidate]],
    sens: list[np.ndarray],
    costs: list[OpCost],
    ties: Iterable[Iterable[str]] = (),
    latency: LatencyTable | None = None,
    avg_bits_by: str = "macs",
    tie_level: str = "activation",
) -> Problem:
    """The ILP instance (ties merged transitively; ``tie_level`` see :class:`Problem`), with
    the exact rational costs (:func:`~hawq.alloc.costs.exact_costs`) budgets are met in."""
    ops = list(report.ops)
    return Problem(
        ops,
        cands,
        sens,
        exact_costs(costs, cands, latency, avg_bits_by),
        merge_groups(ties, ops),
        tie_level,
    )


def to_plan(problem: Problem, solution: Solution, base: OpSetting) -> Plan:
    """Default = ``base`` in floating point; every op names its chosen setting."""
    default = OpSetting(**{**base.as_dict(), "w_bits": None, "a_bits": None})
    return Plan(default, {n: c.to_setting(base) for n, c in solution.chosen(problem).items()})


def _meta(method, report, problem, solution, budgets, candidates, pinned, avg_bits_by) -> dict:
    """What an allocation records beside its plan (``alloc`` stage metrics, ``bits.yaml``)."""
    ops = list(report.ops)
    return {
        "method": method,
        "setting": SETTINGS.get(method, method),
        "tie_level": problem.tie_level,
        "budgets": budgets,
        "objective": solution.objective,
        "totals": solution.totals,
        "solver": {
            "name": "scipy.optimize.milp (HiGHS)",
            "status": solution.status,
            "solve_s": round(solution.solve_s, 6),
        },
        "candidates": [c.key for c in parse_candidates(candidates)],
        "ties": problem.ties,
        "pins": {n: c.key for n, c in pinned.items()},
        "avg_bits_by": avg_bits_by,
        "hessian": {
            "path": report.path,
            **{
                k: report.meta.get(k)
                for k in ("model", "checkpoint", "estimator", "seed", "batches", "batch_size")
            },
        },
        "ops": {
            n: {"setting": problem.choices[i][c].key, "sensitivity": float(problem.sens[i][c])}
            for i, (n, c) in enumerate(zip(ops, solution.index, strict=True))
        },
    }


def allocate(
    report: HessianReport,
    candidates: Iterable[Any],
    method: str = "hawq_v3_act",
    budgets: Mapping[str, float | None] | None = None,
    *,
    model: nn.Module | None = None,
    calib_batches: Iterable | None = None,
    max_batches: int = 4,
    calib_images: int = 32,
    calib_rel_se: float = 0.05,
    fold_bn: bool = True,
    input_size: tuple[int, ...] = (3, 32, 32),
    example: Any = None,
    base: OpSetting | None = None,
    sens: list[np.ndarray] | None = None,
    ties: bool = True,
    tie_groups: Iterable[Iterable[str]] = (),
    pins: Mapping[str, Any] | None = None,
    pin_first: Any = None,
    pin_last: Any = None,
    latency: LatencyTable | None = None,
    avg_bits_by: str = "macs",
    seed: int = 0,
) -> Allocation:
    """Pick one candidate setting per op minimising total sensitivity under ``budgets``.

    Args:
        report: the parsed ``hessian.json``.
        candidates: ``[{w_bits, a_bits[, w_format, a_format]}, ...]``.
        method: one of :data:`~hawq.alloc.sensitivity.METHODS`; for ``measured``
            (or any precomputed objective) pass ``sens``.
        budgets: kind -> limit (see :data:`~hawq.alloc.ilp.BUDGET_KINDS`); None = off.
        model: the FP model (weight errors, GEMM shapes, derived ties).
        calib_batches: ``(x, y)`` batches for activation errors (:data:`ACT_METHODS`).
        max_batches: calibration batches available (an upper bound on the images).
        calib_images: images of the first calibration pass (doubled while any mean's
            relative standard error exceeds ``calib_rel_se``).
        fold_bn: quantize convs with their following BatchNorm folded (as PTQ/QAT do).
        input_size: one input's shape, for tracing.
        example: example inputs of any structure (token ids, a dict) instead of zeros of
            ``input_size``; ``calib_batches`` may then hold dicts of keyword inputs.
        base: the non-bit fields of every op's setting.
        sens: per-op sensitivity arrays overriding ``method``'s (e.g. measured drops).
        ties: derive shared-input tie groups from ``model``.
        tie_groups: extra groups of op names sharing activation settings.
        pins / pin_first / pin_last: fixed settings (op name -> setting).
        latency: table for the ``latency_us`` cost.
        avg_bits_by: weighting of ``avg_bits`` (macs, params, ops).
        seed: for ``method="random"``.

    Raises:
        InfeasibleBudget: with the smallest feasible value of each unmeetable budget.
    """
    t_start = time.perf_counter()
    base = base or OpSetting()
    budgets = {k: v for k, v in (budgets or {}).items() if v is not None}
    if "latency_us" in budgets and latency is None:
        raise HawqError("alloc.latency_us needs a latency table (alloc.latency_table)")
    ops = list(report.ops)
    pinned = resolve_pins(ops, pins, pin_first, pin_last)
    cands = choices_per_op(report, candidates, pinned)
    timings: dict[str, float] = {}
    if sens is None:
        calib = (calib_batches, max_batches, base, seed, calib_images, calib_rel_se, fold_bn)
        sens, timings = sensitivities(method, report, cands, model, *calib)
    groups = list(tie_groups)
    if ties and model is not None:
        groups += shared_input_groups(model, input_size, example)
    costs = op_costs(report, model, input_size, example)
    problem = build_problem(
        report, cands, sens, costs, groups, latency, avg_bits_by, tie_level(method)
    )
    solution = solve(problem, budgets)
    plan = to_plan(problem, solution, base)
    total = time.perf_counter() - t_start
    timings.update(solve_s=solution.solve_s, alloc_s=total - timings.get("calibration_s", 0.0))
    meta = _meta(method, report, problem, solution, budgets, candidates, pinned, avg_bits_by)
    return Allocation(problem, solution, plan, meta, timings)
