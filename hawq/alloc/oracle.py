"""Test oracle and heuristic peer of the exact ILP (:mod:`hawq.alloc.ilp`).

:func:`brute_force` enumerates all ``prod_i k_i`` choices (exact feasibility, the
oracle of the tests on <= 6 ops); :func:`greedy` is the classic HAWQ-V2-style
heuristic kept as a baseline (it ignores ties).
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from hawq.alloc.exact import violation
from hawq.alloc.ilp import LOWER_BOUNDS, Problem, Solution, check_budgets


def _fsum(rows: list[np.ndarray], index: list[int]) -> float:
    """A fast float total (left to right): only to screen plans far from a limit."""
    return float(sum(rows[i][c] for i, c in enumerate(index)))


def _feasible(problem: Problem, budgets: dict[str, float], index: list[int], tol: float) -> bool:
    if tol == 0:  # exact (:func:`violation`); floats screen the plans far from a limit
        for b, limit in budgets.items():
            t = _fsum(problem.costs[b], index)
            d = (limit - t) if b in LOWER_BOUNDS else (t - limit)
            if d > 1e-9 * max(1.0, abs(limit)):
                return False
            if d > -1e-9 * max(1.0, abs(limit)) and b in violation(problem, {b: limit}, index):
                return False
        return True
    for b, limit in budgets.items():
        t = problem.total(b, index)
        slack = tol * max(1.0, abs(limit))
        if (t < limit - slack) if b in LOWER_BOUNDS else (t > limit + slack):
            return False
    return True


def brute_force(
    problem: Problem, budgets: dict[str, float | None] | None = None, tol: float = 0.0
) -> Solution | None:
    """Enumerate every choice (``prod_i k_i`` of them); None when none is feasible.

    With ``tol=0`` feasibility is exact (:func:`~hawq.alloc.exact.violation`).
    """
    budgets = check_budgets(problem, budgets or {})
    start = time.perf_counter()
    best: list[int] | None = None
    best_obj = math.inf
    for index in itertools.product(*(range(len(k)) for k in problem.choices)):
        index = list(index)
        if not _feasible(problem, budgets, index, tol) or not problem.ties_ok(index):
            continue
        obj = _fsum(problem.sens, index)
        if obj < best_obj:
            best, best_obj = index, obj
    if best is None:
        return None
    totals = {b: problem.total(b, best) for b in problem.costs}
    return Solution(
        best, problem.total("sens", best), totals, "enumerated", time.perf_counter() - start
    )


def greedy(problem: Problem, budgets: dict[str, float | None] | None = None) -> Solution | None:
    """Heuristic peer (ignores ties): start at each op's least-sensitive candidate and
    repeatedly take the move with the smallest ``d_sens / d_violation`` until every
    budget holds; None when it gets stuck."""
    budgets = check_budgets(problem, budgets or {})
    start = time.perf_counter()
    index = [
        int(
            np.lexsort(
                (sum(problem.costs[b][i] for b in budgets) if budgets else np.zeros(len(s)), s)
            )[0]
        )
        for i, s in enumerate(problem.sens)
    ]
    sign = {b: (-1.0 if b in LOWER_BOUNDS else 1.0) for b in budgets}
    while True:
        over = {b: sign[b] * (problem.total(b, index) - v) for b, v in budgets.items()}
        over = {b: o for b, o in over.items() if o > 0}
        if not over:
            break
        best, best_ratio = None, math.inf
        for i, cur in enumerate(index):
            for c in range(len(problem.choices[i])):
                gain = sum(
                    sign[b]
                    * (problem.costs[b][i][cur] - problem.costs[b][i][c])
                    / max(abs(budgets[b]), 1e-300)
                    for b in over
                )
                if gain <= 0:
                    continue
                ratio = (problem.sens[i][c] - problem.sens[i][cur]) / gain
                if ratio < best_ratio:
                    best, best_ratio = (i, c), ratio
        if best is None:
            return None
        index[best[0]] = best[1]
    totals = {b: problem.total(b, index) for b in problem.costs}
    return Solution(
        index, problem.total("sens", index), totals, "greedy", time.perf_counter() - start
    )
