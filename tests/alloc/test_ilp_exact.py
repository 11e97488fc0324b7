"""Exactness of the ILP (issue 15 items 1-3): optimal whatever the sensitivities' dynamic
range, never over a budget (checked in rational arithmetic), and an infeasibility message
that names each budget's own bound. The oracle is an independent enumeration."""

from __future__ import annotations

import itertools
import re
from fractions import Fraction

import numpy as np
import pytest

from hawq.alloc import InfeasibleBudget, Problem, solve

from .cases import SETTINGS

LOWER = {"int4_share"}


def _exact(p: Problem, kind: str, index) -> Fraction:
    rows = p.sens if kind == "sens" else p.costs[kind]
    return sum((Fraction(float(rows[i][c])) for i, c in enumerate(index)), Fraction(0))


def _meets(p: Problem, budgets: dict[str, float], index) -> bool:
    for b, limit in budgets.items():
        t = _exact(p, b, index)
        if (t < Fraction(limit)) if b in LOWER else (t > Fraction(limit)):
            return False
    return p.ties_ok(list(index))


def _enumerate(p: Problem, budgets: dict[str, float]) -> Fraction | None:
    """Exact optimum by enumeration (None: infeasible)."""
    best = None
    for index in itertools.product(*(range(len(k)) for k in p.choices)):
        if _meets(p, budgets, index):
            v = _exact(p, "sens", index)
            best = v if best is None or v < best else best
    return best


def _wide_problem(rng: np.random.Generator, n_ops: int, ties: bool) -> Problem:
    """Sensitivities spanning 1e-3 .. 1e4 (a W2-like frontier end beside tiny ones)."""
    ks = [int(rng.integers(3, 5)) for _ in range(n_ops)]
    choices = [list(rng.permutation(SETTINGS))[:k] for k in ks]
    sens = [10 ** rng.uniform(-3, 4, k) for k in ks]
    costs = {"bops": [rng.integers(1, 100, k).astype(float) for k in ks],
             "size_mb": [rng.random(k) * 1e3 for k in ks]}  # fmt: skip
    groups = []
    if ties and n_ops >= 3:
        groups = [[f"op{i}" for i in rng.choice(n_ops, 2, replace=False)]]
    return Problem([f"op{i}" for i in range(n_ops)], choices, sens, costs, groups)


def test_optimal_when_sensitivities_span_seven_decades():
    rng = np.random.default_rng(20261205)
    checked = 0
    for trial in range(160):
        p = _wide_problem(rng, int(rng.integers(2, 7)), ties=trial % 3 == 0)
        budgets = {}
        for b in list(rng.permutation(["bops", "size_mb"]))[: int(rng.integers(1, 3))]:
            lo = sum(float(c.min()) for c in p.costs[b])
            hi = sum(float(c.max()) for c in p.costs[b])
            budgets[b] = float(rng.uniform(lo, hi))
        best = _enumerate(p, budgets)
        if best is None:
            with pytest.raises(InfeasibleBudget):
                solve(p, budgets)
            continue
        sol = solve(p, budgets)
        assert _meets(p, budgets, sol.index)
        got = _exact(p, "sens", sol.index)
        assert got <= best * (1 + Fraction(1, 10**12)), (trial, float(got), float(best))
        checked += 1
    assert checked > 100


def test_no_plan_exceeds_a_budget_even_by_rounding():
    """Limits a hair (1e-10 .. 1e-8 relative) below the total of a much better plan: a
    solver tolerance of 1e-7 would accept that plan; the exact check must not."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        n_ops = int(rng.integers(2, 6))
        ks = [4] * n_ops
        sens = [10 ** rng.uniform(-3, 4, k) for k in ks]
        costs = {"bops": [1e6 + rng.integers(0, 1000, k).astype(float) for k in ks],
                 "int4_share": [rng.random(k) for k in ks]}  # fmt: skip
        p = Problem([f"op{i}" for i in range(n_ops)], [list(SETTINGS)] * n_ops, sens, costs)
        best_free = [int(np.argmin(s)) for s in sens]
        kind = "int4_share" if trial % 2 else "bops"
        t = float(_exact(p, kind, best_free))
        eps = 10 ** rng.uniform(-10, -8) * abs(t)
        budgets = {kind: t + eps if kind in LOWER else t - eps}
        best = _enumerate(p, budgets)
        if best is None:
            continue
        sol = solve(p, budgets)
        assert _meets(p, budgets, sol.index), (trial, budgets, sol.totals)
        assert _exact(p, "sens", sol.index) <= best * (1 + Fraction(1, 10**12))


def test_rounding_case_that_a_tolerant_solver_accepts():
    # two ops: the best plan exceeds the budget by 3e-8 relative; the only compliant
    # plan is 1e4 times worse
    s = [np.array([1e-3, 1e4, 1e4, 1e4]), np.array([1e-3, 2e-3, 1e4, 1e4])]
    c = [np.array([5e5 + 0.03, 5e5 - 1.0, 6e5, 6e5]), np.array([5e5, 5e5, 6e5, 6e5])]
    p = Problem(["a", "b"], [list(SETTINGS)] * 2, s, {"bops": c})
    sol = solve(p, {"bops": 1e6})
    assert _meets(p, {"bops": 1e6}, sol.index)
    assert sol.index == [1, 0]


def _bound(p: Problem, kind: str) -> float:
    totals = [float(_exact(p, kind, ix))
              for ix in itertools.product(*(range(len(k)) for k in p.choices))
              if p.ties_ok(list(ix))]  # fmt: skip
    return max(totals) if kind in LOWER else min(totals)


@pytest.mark.parametrize("seed", range(6))
def test_each_infeasible_budget_names_its_own_smallest_value(seed):
    rng = np.random.default_rng(seed)
    n_ops = 4
    ks = [4] * n_ops
    p = Problem([f"op{i}" for i in range(n_ops)], [list(SETTINGS)] * n_ops,
                [rng.random(k) for k in ks],
                {"bops": [rng.integers(1, 100, k).astype(float) for k in ks],
                 "size_mb": [rng.random(k) for k in ks],
                 "int4_share": [rng.random(k) / n_ops for k in ks]},
                [["op0", "op2"]] if seed % 2 else [])  # fmt: skip
    kinds = ["bops", "size_mb", "int4_share"][: 2 + seed % 2]
    bounds = {k: _bound(p, k) for k in kinds}
    budgets = {k: (v * 1.05 + 0.01 if k in LOWER else v * 0.9) for k, v in bounds.items()}
    with pytest.raises(InfeasibleBudget) as e:
        solve(p, budgets)
    msg = str(e.value)
    assert "jointly infeasible" not in msg
    for k, v in bounds.items():
        word = "largest" if k in LOWER else "smallest"
        m = re.search(rf"alloc\.{k}=\S+ is infeasible; the {word} feasible value is ([^ ;(]+)",
                      msg)  # fmt: skip
        assert m, msg
        assert float(m.group(1)) == pytest.approx(v, rel=1e-5)
        assert e.value.bounds[k] == pytest.approx(v, rel=1e-12)
