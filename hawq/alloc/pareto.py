"""Sensitivity-vs-budget frontier: solve the ILP at a sweep of one budget's values.

Each point is the exact optimum ``min Omega`` under ``cost_b <= B`` (``>= B`` for
``int4_share``) plus any fixed other budgets. Sweeping ``B`` from the smallest
feasible cost to the cost of the unconstrained optimum traces the frontier;
:func:`pareto_filter` keeps the points no other point beats on both axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hawq.alloc.exact import extreme, solve
from hawq.alloc.ilp import LOWER_BOUNDS, InfeasibleBudget, Problem


@dataclass
class FrontierPoint:
    """One solve of the sweep: the budget value and what the optimum reached."""

    kind: str
    budget: float
    objective: float | None  # None: infeasible
    cost: float | None  # the optimum's total of ``kind``
    index: list[int] | None

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "budget": self.budget,
            "objective": self.objective,
            "cost": self.cost,
            "index": self.index,
        }


def budget_range(
    problem: Problem, kind: str, others: dict[str, float | None] | None = None
) -> tuple[float, float] | None:
    """``(tightest feasible, loosest useful)`` value of budget ``kind`` given ``others``.

    Past the loosest value (the cost of the unconstrained optimum) the optimum
    no longer changes. None when ``others`` alone are infeasible.
    """
    lower = kind in LOWER_BOUNDS
    tight = extreme(problem, kind, others, maximize=lower)
    if tight is None:
        return None
    free = solve(problem, others)
    return tight, free.totals[kind]


def sweep(
    problem: Problem, kind: str, values: list[float], others: dict[str, float | None] | None = None
) -> list[FrontierPoint]:
    """Solve at each value of budget ``kind`` (other budgets fixed); infeasible points kept."""
    points = []
    for v in values:
        try:
            sol = solve(problem, {**(others or {}), kind: float(v)})
        except InfeasibleBudget:
            points.append(FrontierPoint(kind, float(v), None, None, None))
            continue
        points.append(FrontierPoint(kind, float(v), sol.objective, sol.totals[kind], sol.index))
    return points


def frontier(
    problem: Problem, kind: str, n: int = 12, others: dict[str, float | None] | None = None
) -> list[FrontierPoint]:
    """``n`` budgets evenly spaced over :func:`budget_range`, Pareto-filtered."""
    rng = budget_range(problem, kind, others)
    if rng is None:
        return []
    values = np.linspace(rng[0], rng[1], n) if rng[0] != rng[1] else np.array([rng[0]])
    return pareto_filter(sweep(problem, kind, list(values), others))


def pareto_filter(points: list[FrontierPoint]) -> list[FrontierPoint]:
    """Feasible points not dominated in (cost, objective), one per distinct cost, by cost.

    For ``int4_share`` (higher is better) a point dominates another when its
    share is at least as high and its objective at most as high.
    """
    feas = [p for p in points if p.objective is not None]
    if not feas:
        return []
    lower = feas[0].kind in LOWER_BOUNDS
    key = (lambda p: (-p.cost, p.objective)) if lower else (lambda p: (p.cost, p.objective))
    out: list[FrontierPoint] = []
    best = np.inf
    for p in sorted(feas, key=key):
        if best == np.inf or p.objective < best - 1e-12 * max(1.0, abs(best)):
            out.append(p)
            best = p.objective
    return sorted(out, key=lambda p: p.cost)
