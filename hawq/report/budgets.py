"""Budgets as fractions of their range, and the costs of finished runs' plans.

:func:`budget_range` gives the HAWQ-V3 budget parametrisation: with per-op candidate
settings, a budget is :math:`B(f) = B_{min} + f\\,(B_{max} - B_{min})` where
:math:`B_{min}` / :math:`B_{max}` are the totals with every op the ILP decides at its
cheapest / dearest candidate and every pinned op at its pin (``size_mb`` or ``bops``; costs
are separable per op, so these are the exact extremes without ties): the fraction runs over
the decided ops only, as in HAWQ-V3, whose first and last layers are fixed at 8 bits.

:func:`tradeoff_points` gives the accuracy-vs-cost points of finished ``ptq``/``qat`` runs
(e.g. a Hydra multirun over budgets): the cost is recomputed from the plan the stage
actually applied (``<stage>_bits.yaml``) and the FP model's op inventory, so uniform
baselines and allocated plans share one axis.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from hawq.errors import HawqError
from hawq.io import read_json
from hawq.report.tables import RESULTS


def budget_range(
    hessian_json: str | Path,
    candidates: Sequence[Mapping[str, Any]],
    kind: str,
    pins: Mapping[str, Any] | None = None,
    pin_first: Any = None,
    pin_last: Any = None,
) -> tuple[float, float]:
    """``(B_min, B_max)`` of ``kind`` (``size_mb`` or ``bops``) over the ops the ILP decides.

    Pinned ops (``pins``, ``pin_first``, ``pin_last``, as in ``cfg.alloc``) have one
    setting, so they add the same constant to both ends: ``B(f)`` moves only over the
    decided ops (HAWQ-V3 fixes the first and last layer at 8 bits and takes the range
    over the others), and ``B(0)`` is the cheapest plan the pins allow, always feasible.
    Units as in :mod:`hawq.alloc.costs`: ``size_mb`` MB, ``bops`` G bit-ops per image.
    """
    from hawq.alloc import read_hessian
    from hawq.alloc.allocate import choices_per_op, resolve_pins
    from hawq.alloc.costs import OpCost, exact_bops, exact_size_mb

    fns = {"size_mb": exact_size_mb, "bops": exact_bops}  # the allocator's exact costs
    if kind not in fns:
        raise HawqError(f"budget kind {kind!r} is invalid; allowed: {', '.join(fns)}")
    report = read_hessian(hessian_json)
    pinned = resolve_pins(list(report.ops), pins, pin_first, pin_last)
    per_op = choices_per_op(report, candidates, pinned)
    lo = hi = Fraction(0)  # exact sums, rounded up: B(0) and B(1) are feasible exactly
    for (name, op), cands in zip(report.ops.items(), per_op, strict=True):
        cost = OpCost(name, op.kind, op.numel, op.macs)
        vals = [fns[kind](cost, c) for c in cands]
        lo += min(vals)
        hi += max(vals)
    return _up(lo), _up(hi)


def _up(v: Fraction) -> float:
    """The smallest float >= ``v``."""
    f = float(v)
    return math.nextafter(f, math.inf) if Fraction(f) < v else f


def parse_pin(text: str) -> dict[str, int]:
    """``8`` -> w8a8, ``4,8`` -> w4a8 (the CLI's pin syntax)."""
    try:
        bits = [int(v) for v in text.split(",")]
    except ValueError:
        bits = []
    if len(bits) not in (1, 2):
        raise HawqError(f"pin {text!r} is invalid; allowed: BITS or W_BITS,A_BITS (e.g. 8 or 4,8)")
    return {"w_bits": bits[0], "a_bits": bits[-1]}


def budget_at(lo: float, hi: float, fraction: float) -> float:
    """:math:`B_{min} + f (B_{max} - B_{min})` for ``0 <= f <= 1`` (``B(0) = B_min`` and
    ``B(1) = B_max`` exactly)."""
    if not 0.0 <= fraction <= 1.0:
        raise HawqError(f"fraction={fraction} is invalid; allowed: 0 <= fraction <= 1")
    return hi if fraction == 1.0 else lo + fraction * (hi - lo)


def plan_costs(
    plan_path: str | Path, checkpoint: str | Path, input_size: tuple[int, ...] = (3, 32, 32)
) -> dict[str, float]:
    """Size (MB), GBOPs per image and INT4 MAC share of the plan at ``plan_path``.

    ``BOPs = sum_l MACs_l * b_w * b_a`` (an FP operand counts 32 bits), size
    ``= sum_l params_l * b_w / 8 / 2^20``; both from :mod:`hawq.alloc.costs`.
    """
    from hawq.alloc.candidates import Candidate
    from hawq.alloc.costs import OpCost, bops, int4_macs, size_mb
    from hawq.checkpoint import load_model
    from hawq.models.ops import op_inventory
    from hawq.quant.plan import load_plan

    plan, _ = load_plan(plan_path)
    model, _ = load_model(checkpoint)
    out = {"size_mb": 0.0, "bops": 0.0, "int4_macs": 0.0, "macs": 0.0}
    for info in op_inventory(model, input_size):
        st = plan.setting(info.name)
        op = OpCost(info.name, info.kind, info.params, info.macs)
        c = Candidate(st.w_bits, st.a_bits, st.w_format, st.a_format)
        out["size_mb"] += size_mb(op, c)
        out["bops"] += bops(op, c) / 1e9
        out["int4_macs"] += int4_macs(op, c)
        out["macs"] += info.macs
    out["int4_share"] = out.pop("int4_macs") / max(out.pop("macs"), 1.0)
    return out


def tradeoff_points(
    run_globs: Sequence[str], stage: str = "ptq", cost: str = "bops"
) -> tuple[list[tuple[float, float]], float | None]:
    """``(cost, quantized accuracy)`` of every finished ``stage`` among the runs, and the
    FP accuracy they were measured against (None when no run matched)."""
    if stage not in ("ptq", "qat"):
        raise HawqError(f"stage={stage!r} is invalid; allowed: ptq, qat")
    if cost not in ("bops", "size_mb", "int4_share"):
        raise HawqError(f"cost={cost!r} is invalid; allowed: bops, int4_share, size_mb")
    points, fp = [], None
    for pattern in run_globs:
        for run in sorted(glob.glob(pattern)):
            res_path, plan = Path(run) / RESULTS, Path(run) / f"{stage}_bits.yaml"
            if not res_path.is_file() or not plan.is_file():
                continue
            res = read_json(res_path)
            metrics = res.get("stages", {}).get(stage)
            if not metrics:
                continue
            costs = plan_costs(plan, res["config"]["paths"]["checkpoint"])
            points.append((costs[cost], metrics["quantized"]["acc"]))
            fp = metrics.get("fp", {}).get("acc", fp)
    return points, fp
