"""Exact answers of the allocation ILP (:mod:`hawq.alloc.ilp`): rational feasibility checks,
the cut-and-resolve search, the near-limit bands, budget diagnoses and :func:`solve`.

HiGHS accepts rows violated by up to its ~1e-9 feasibility tolerance; every answer is
checked in rational arithmetic (:func:`violation`), a violating plan is cut off
(:func:`_cut`) and the solve repeated, so the first exactly feasible answer is optimal.
When plans within the tolerance keep coming (more than :data:`TRIES` solves), every limit is
moved inward by a margin HiGHS cannot cross and the bands between the moved and the true
limits are searched on their own (:func:`_near_limits`).
"""

from __future__ import annotations

import math
import time
import warnings
from fractions import Fraction

import numpy as np

from hawq.alloc.ilp import (
    LOWER_BOUNDS,
    Bounds,
    InfeasibleBudget,
    Problem,
    Solution,
    check_budgets,
    exact_total,
    row_bounds,
    row_scale,
    solve_milp,
)
from hawq.errors import HawqError

TRIES = 64  # solves before the limits move inward (:func:`_near_limits`; 4x as many there)


def violation(problem: Problem, budgets: dict[str, float], index: list[int]) -> dict[str, Fraction]:
    """Budget -> exact amount (> 0) by which ``index`` misses it (only the missed ones).

    The rule: the exact total (:func:`exact_total`) is at most the budget's float (at
    least, for :data:`LOWER_BOUNDS`); equality meets it. No float sum takes part.
    """
    out = {}
    for b, limit in budgets.items():
        t, lim = exact_total(problem, b, index), Fraction(limit)
        miss = lim - t if b in LOWER_BOUNDS else t - lim
        if miss > 0:
            out[b] = miss
    return out


def _value(problem: Problem, objective: np.ndarray, index: list[int]) -> Fraction:
    """``objective . x`` of plan ``index``, exactly."""
    off = problem.offsets
    return sum((Fraction(float(objective[off[i] + c])) for i, c in enumerate(index)), Fraction(0))


def _cut(problem: Problem, index: list[int], miss: dict[str, Fraction]) -> np.ndarray:
    """Mask of a cut ``sum x <= n_ops - 1`` that removes ``index`` and, when it misses a
    budget ``b``, every plan whose every op costs at least as much in ``b`` (at most, for a
    lower budget): those miss ``b`` too. Without a missed budget (a broken tie) it
    removes ``index`` alone."""
    off = problem.offsets
    mask = np.zeros(int(off[-1]))
    b = next(iter(miss), None)
    for i, c in enumerate(index):
        if b is None:
            mask[off[i] + c] = 1.0
            continue
        row = problem.exact[b][i]
        mask[off[i] : off[i + 1]] = [
            (v <= row[c]) if b in LOWER_BOUNDS else (v >= row[c]) for v in row
        ]
    return mask


def _search(
    problem: Problem,
    objective: np.ndarray,
    budgets: dict[str, float],
    bounds: Bounds,
    cuts: list[np.ndarray],
    tries: int,
    stop: Fraction | None = None,
) -> tuple[list[int] | None, bool, str]:
    """Best plan meeting ``budgets`` and ties exactly among those HiGHS sees within ``bounds``.

    HiGHS optimises over a superset of the exactly feasible plans (its tolerance); an
    answer that misses a budget or a tie is cut off and the solve repeated, so the first
    exactly feasible answer is optimal within ``bounds``. Returns ``(plan, True, status)``;
    ``(None, True, status)`` when no plan within ``bounds`` meets them or none has a
    value below ``stop``; ``(None, False, status)`` after ``tries`` cuts.
    """
    for _ in range(tries):
        res = solve_milp(problem, objective, bounds, cuts)
        if res.status == 2:
            return None, True, "infeasible"
        if not res.success or res.x is None:
            raise HawqError(f"the ILP solver failed: {res.message}")
        index = _index(problem, res.x)
        if stop is not None and _value(problem, objective, index) >= stop:
            return None, True, res.message  # the relaxed optimum: nothing better here
        miss = violation(problem, budgets, index)
        if not miss and problem.ties_ok(index):
            return index, True, res.message
        cuts.append(_cut(problem, index, miss))
    return None, False, f"{tries} plans within the solver's tolerance of a limit"


def _margin(problem: Problem, kind: str, limit: float) -> float:
    """A move of limit ``kind`` that HiGHS' tolerances (:data:`TOL` on the scaled row,
    the row's widening and integrality) cannot bridge, with a factor 30 to spare."""
    row = np.concatenate(problem.costs[kind])
    return 1e-7 * (row_scale(row, limit, limit) + float(np.abs(row).sum()))


def _near_limits(
    problem: Problem,
    objective: np.ndarray,
    budgets: dict[str, float],
    cuts: list[np.ndarray],
    tries: int,
) -> tuple[list[int] | None, str]:
    """Optimum when many plans lie within HiGHS' tolerance beyond a limit.

    Every limit moved inward by :func:`_margin` leaves HiGHS only exactly feasible plans;
    then each budget's band between its moved and its true limit is searched for a
    better plan (:func:`_search` with ``stop``, ``4 * tries`` solves). Both parts together
    cover every plan; a band whose search runs out of solves is named in a warning.
    """
    inward = {
        b: v + _margin(problem, b, v) * (1 if b in LOWER_BOUNDS else -1) for b, v in budgets.items()
    }
    best, done, status = _search(problem, objective, budgets, row_bounds(inward), cuts, tries)
    if not done:
        raise HawqError(
            "the ILP solver returns plans that miss a budget even with every "
            f"limit moved inward (to {inward}); budgets {budgets}"
        )
    for b, v in budgets.items():
        band = {**row_bounds(budgets), b: (v, inward[b]) if b in LOWER_BOUNDS else (inward[b], v)}
        stop = None if best is None else _value(problem, objective, best)
        found, done, why = _search(problem, objective, budgets, band, cuts, 4 * tries, stop)
        if found is not None:  # below ``stop``: better than the inward plan
            best = found
        if not done:
            warnings.warn(
                f"alloc: exact optimality not certified within {v - inward[b]:+.3g} "
                f"of {b}={v!r} ({why}); the plan meets every budget exactly",
                RuntimeWarning,
                stacklevel=3,
            )
    return best, status


def _exact_milp(
    problem: Problem, objective: np.ndarray, budgets: dict[str, float]
) -> tuple[list[int] | None, str]:
    """Optimal plan that meets every budget and tie *exactly*, or None (see :func:`_search`;
    :func:`_near_limits` when :data:`TRIES` solves do not settle it)."""
    cuts: list[np.ndarray] = []
    index, done, status = _search(problem, objective, budgets, row_bounds(budgets), cuts, TRIES)
    return (index, status) if done else _near_limits(problem, objective, budgets, cuts, TRIES)


def _index(problem: Problem, x: np.ndarray) -> list[int]:
    off = problem.offsets
    return [int(np.argmax(x[off[i] : off[i + 1]])) for i in range(len(problem.ops))]


def _round(v: Fraction, up: bool) -> float:
    """The smallest float >= ``v`` (``up``), else the largest float <= ``v``."""
    f = float(v)
    if (Fraction(f) < v) if up else (Fraction(f) > v):
        f = math.nextafter(f, math.inf if up else -math.inf)
    return f


def _num(v: float) -> str:
    """The shortest text that reads back as ``v`` exactly (``repr``, no trailing ``.0``)."""
    text = repr(v)
    return text[:-2] if text.endswith(".0") else text


def _shown(v: Fraction, up: bool, gap: Fraction | float = math.inf) -> str:
    """``v`` rounded outward (up with ``up``) to the fewest significant digits, at least 6,
    that still read as a feasible budget and lie closer to ``v`` than ``gap`` (the
    budget's distance): a tiny gap gets every digit it needs (the float's ``repr`` at
    most)."""
    f = _round(v, up)
    if f == 0 or not math.isfinite(f):
        return _num(f)
    for digits in range(6, 18):
        e = Fraction(10) ** (math.floor(math.log10(abs(f))) - digits + 1)
        r = (math.ceil(v / e) if up else math.floor(v / e)) * e
        text = f"{float(r):.{digits}g}"
        q = Fraction(float(text))
        if ((q >= v) if up else (q <= v)) and abs(q - v) < gap:
            return text
    return _num(f)


def extreme_exact(
    problem: Problem,
    kind: str,
    budgets: dict[str, float | None] | None = None,
    maximize: bool = False,
) -> Fraction | None:
    """Smallest (largest with ``maximize``) exact total of cost ``kind`` any allocation
    meeting ``budgets`` (exactly), ties and pins can reach; None when none meets them."""
    budgets = check_budgets(problem, budgets or {})
    row = np.concatenate(problem.costs[kind])
    index, _ = _exact_milp(problem, -row if maximize else row, budgets)
    return None if index is None else exact_total(problem, kind, index)


def extreme(
    problem: Problem,
    kind: str,
    budgets: dict[str, float | None] | None = None,
    maximize: bool = False,
) -> float | None:
    """:func:`extreme_exact` rounded inward (up for the smallest total, down for the
    largest): as a budget of that direction it is feasible."""
    v = extreme_exact(problem, kind, budgets, maximize)
    return None if v is None else _round(v, up=not maximize)


def _unmet(problem: Problem, b: str, budgets: dict[str, float]) -> tuple[Fraction, str] | None:
    """Budget ``b``'s exact bound given the other budgets (else on its own) and which."""
    others = {k: v for k, v in budgets.items() if k != b}
    lower = b in LOWER_BOUNDS
    best = extreme_exact(problem, b, others, maximize=lower)
    if best is not None:
        return best, "given the other budgets"
    best = extreme_exact(problem, b, {}, maximize=lower)
    return None if best is None else (best, "on its own")


def _diagnose(problem: Problem, budgets: dict[str, float]) -> InfeasibleBudget:
    """Explain infeasibility: for each budget that cannot be met, its smallest (largest for
    a lower bound) feasible value given the other budgets, or on its own when the others
    cannot be met either, printed with the digits that show how far the budget misses it
    (and the miss itself); ``bounds`` holds it rounded to a feasible float."""
    if _exact_milp(problem, np.zeros(int(problem.offsets[-1])), {})[0] is None:
        return InfeasibleBudget(
            f"no allocation satisfies the tie groups and pins alone (ties: {problem.ties})", {}
        )
    parts, bounds = [], {}
    for b, limit in budgets.items():
        found = _unmet(problem, b, budgets)
        if found is None:
            continue
        best, where = found
        lower = b in LOWER_BOUNDS
        gap = Fraction(limit) - best if lower else best - Fraction(limit)
        if gap > 0:
            bounds[b] = _round(best, up=not lower)
            word, side = ("largest", "below") if lower else ("smallest", "above")
            ctx = f"; {where}, ties and pins" if len(budgets) > 1 or problem.ties else ""
            parts.append(
                f"alloc.{b}={_num(limit)} is infeasible; the {word} feasible value is "
                f"{_shown(best, not lower, gap)} ({float(gap):.3g} {side} the "
                f"budget{ctx})"
            )
    if not parts:  # each budget is met given the others' bounds on their own: name them all
        for b in budgets:
            lower = b in LOWER_BOUNDS
            best = extreme_exact(problem, b, {}, maximize=lower)
            if best is not None:
                bounds[b] = _round(best, up=not lower)
                parts.append(
                    f"alloc.{b} {'<=' if lower else '>='} {_shown(best, not lower)} on its own"
                )
        msg = f"budgets {budgets} are jointly infeasible; feasible alone: " + ", ".join(parts)
        return InfeasibleBudget(msg, bounds)
    return InfeasibleBudget("; ".join(parts), bounds)


def solve(problem: Problem, budgets: dict[str, float | None] | None = None) -> Solution:
    """Minimise total sensitivity under ``budgets`` (kind -> limit; None = off).

    The returned plan meets every budget exactly (its exact rational total is at most,
    for ``int4_share`` at least, the limit: equality meets it; see :func:`violation`)
    and is optimal whatever the sensitivities' dynamic range (see :func:`shifted_objective`).
    Its reported totals are the exact ones correctly rounded, so within the limits too.

    Raises:
        InfeasibleBudget: no allocation meets them; the message names, for each
            budget that cannot be met, the smallest (largest for ``int4_share``)
            feasible value, with the digits that show the gap.
    """
    budgets = check_budgets(problem, budgets or {})
    start = time.perf_counter()
    index, status = _exact_milp(problem, np.concatenate(problem.sens), budgets)
    elapsed = time.perf_counter() - start
    if index is None:
        raise _diagnose(problem, budgets)
    totals = {b: problem.total(b, index) for b in problem.costs}
    return Solution(index, problem.total("sens", index), totals, status, elapsed)
