"""Exact bit allocation: a multiple-choice knapsack solved as an integer linear program.

Op ``i`` picks exactly one of its candidate settings ``c``; ``x[i,c]`` in {0, 1}::

    minimise    sum_{i,c} s[i,c] x[i,c]                       (total sensitivity)
    subject to  sum_c x[i,c] = 1                               for every op i
                sum_{i,c} cost_b[i,c] x[i,c] <= B_b            for every upper budget b
                sum_{i,c} cost_b[i,c] x[i,c] >= B_b            for a lower budget (int4_share)
                sum_{c: lvl(c)=v} x[j,c] = sum_{c: lvl(c)=v} x[r,c]
                                                               for tie group (r, j, ...), level v

where ``lvl(c)`` is the activation setting (bits, format): ops reading one
tensor share it; with ``tie_level="layer"`` (HAWQ-V3) it is the whole candidate.
Solved by :func:`scipy.optimize.milp` (HiGHS branch and cut)
with zero MIP gaps on an objective shifted per op (``s[i,c] - min_c s[i,c]``, an
exact constant offset) so that the decisive differences stay far above HiGHS'
tolerances however many decades the sensitivities span. Every answer is then
checked in rational arithmetic (:mod:`hawq.alloc.exact`, which holds :func:`solve`): every
cost is an exact rational
(the cost models' formulas on integer MACs, parameters and bits, see
:func:`hawq.alloc.costs.exact_costs`; a float input is the binary rational it holds), a
plan meets a budget when its exact total is at most (at least) the budget's float, so a
plan whose cost equals the budget is feasible, and no float rounding of a sum decides
anything. HiGHS accepts rows violated by up to its ~1e-9 feasibility tolerance; such a
plan is cut off and the solve repeated, so the first exactly feasible
answer is optimal. When plans within the tolerance keep coming, every limit is moved
inward by a margin HiGHS cannot cross and the bands between the moved and the true
limits are searched on their own. This module holds the formulation (:class:`Problem`, the
rows, one HiGHS call); :mod:`hawq.alloc.oracle` holds
the brute-force test oracle and the greedy HAWQ-V2-style baseline.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import coo_array

from hawq.alloc.candidates import Candidate
from hawq.errors import HawqError, choices

BUDGET_KINDS = ("avg_bits", "size_mb", "bops", "latency_us", "int4_share")
LOWER_BOUNDS = frozenset({"int4_share"})  # "at least"; every other budget is "at most"
# HiGHS' feasibility tolerances, and how far each (scaled) budget row is widened for it:
# its presolve declares a model infeasible when the cheapest plan's cost equals the
# limit up to one ulp, so a plan exactly at a limit must lie strictly inside the row.
TOL = 1e-9


@dataclass
class Problem:
    """One allocation instance.

    Attributes:
        ops: op names in network order.
        choices: per op, its candidate settings.
        sens: per op, sensitivity of each candidate (shape ``(len(choices[i]),)``).
        costs: budget kind -> per op, that cost of each candidate; totals add over ops.
            Entries may be :class:`~fractions.Fraction` (exact costs, e.g. from
            :func:`hawq.alloc.costs.exact_costs`); ``costs`` then holds them rounded
            to floats for the solver and :attr:`exact` the rationals budgets are
            checked against. A float entry is exact as it is.
        ties: groups of op names whose settings must be equal.
        tie_level: what a tie binds: ``activation`` (the activation bits and format:
            ops reading one tensor) or ``layer`` (the whole candidate, HAWQ-V3's ties).
        exact: (derived) budget kind -> per op, each candidate's exact cost.
        exact_sens: (derived) per op, each candidate's sensitivity as a rational.
    """

    ops: list[str]
    choices: list[list[Candidate]]
    sens: list[np.ndarray]
    costs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ties: list[list[str]] = field(default_factory=list)
    tie_level: str = "activation"
    exact: dict[str, list[list[Fraction]]] = field(init=False, repr=False, compare=False)
    exact_sens: list[list[Fraction]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tie_level not in ("activation", "layer"):
            raise HawqError(f"tie_level={self.tie_level!r} is invalid; allowed: activation, layer")
        n = len(self.ops)
        if len(self.choices) != n or len(self.sens) != n:
            raise ValueError("ops, choices and sens must have one entry per op")
        raw = self.costs  # a Fraction entry becomes its correctly rounded float here
        self.sens = [np.asarray(s, dtype=float) for s in self.sens]
        self.costs = {b: [np.asarray(c, dtype=float) for c in v] for b, v in raw.items()}
        for i, k in enumerate(self.choices):
            if not k:
                raise HawqError(f"op {self.ops[i]} has no candidate setting")
            arrays = [self.sens[i]] + [v[i] for v in self.costs.values()]
            if any(a.shape != (len(k),) for a in arrays):
                raise ValueError(f"op {self.ops[i]}: sensitivity/cost length != candidates")
            if not all(np.isfinite(a).all() for a in arrays):
                raise HawqError(f"op {self.ops[i]}: a sensitivity or cost is not finite")
        self.exact = {b: [[rational(x) for x in c] for c in v] for b, v in raw.items()}
        self.exact_sens = [[Fraction(float(x)) for x in s] for s in self.sens]
        index = {name: i for i, name in enumerate(self.ops)}
        for g in self.ties:
            missing = [o for o in g if o not in index]
            if missing:
                raise HawqError(f"tie group names unknown op(s) {choices(missing)}")

    @property
    def offsets(self) -> np.ndarray:
        """Start of each op's block in the flat variable vector."""
        return np.concatenate([[0], np.cumsum([len(k) for k in self.choices])])

    def total(self, kind: str, index: list[int]) -> float:
        """Sum of cost ``kind`` (or ``"sens"``) over ops for one choice per op: the exact
        total (:func:`exact_total`) correctly rounded, so it is within every budget the
        plan meets."""
        return float(exact_total(self, kind, index))

    def level(self, c: Candidate) -> tuple:
        """What tied ops must agree on (see ``tie_level``)."""
        if self.tie_level == "layer":
            return (c.w_bits, c.w_format if c.w_bits is not None else "int", *c.a_level)
        return c.a_level

    def ties_ok(self, index: list[int]) -> bool:
        pos = {name: i for i, name in enumerate(self.ops)}
        for g in self.ties:
            levels = {self.level(self.choices[pos[o]][index[pos[o]]]) for o in g}
            if len(levels) > 1:
                return False
        return True


@dataclass
class Solution:
    """The chosen candidate index per op, with objective and cost totals."""

    index: list[int]
    objective: float
    totals: dict[str, float]
    status: str
    solve_s: float

    def chosen(self, problem: Problem) -> dict[str, Candidate]:
        pairs = enumerate(zip(problem.ops, self.index, strict=True))
        return {n: problem.choices[i][c] for i, (n, c) in pairs}


def rational(x: object) -> Fraction:
    """A cost entry as a rational: a Fraction or int as it is, anything else via float."""
    return x if isinstance(x, Fraction) else Fraction(x if isinstance(x, int) else float(x))


class InfeasibleBudget(HawqError):
    """No allocation meets the budgets; ``bounds`` maps each binding budget to its limit."""

    def __init__(self, message: str, bounds: dict[str, float]) -> None:
        super().__init__(message)
        self.bounds = bounds


def check_budgets(problem: Problem, budgets: dict[str, float]) -> dict[str, float]:
    out = {}
    for b, v in budgets.items():
        if v is None:
            continue
        if b not in problem.costs:
            raise HawqError(
                f"budget {b} has no cost model here; available: {choices(problem.costs)}"
            )
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise HawqError(f"alloc.{b}={v!r} is invalid; allowed: a finite number or null")
        out[b] = float(v)
    return out


Bounds = dict[str, tuple[float, float]]  # budget kind -> (lo, hi) of its row for HiGHS


def row_bounds(budgets: dict[str, float]) -> Bounds:
    """Each budget as row bounds: ``[B, inf)`` for a lower budget, ``(-inf, B]`` otherwise."""
    return {b: (v, math.inf) if b in LOWER_BOUNDS else (-math.inf, v) for b, v in budgets.items()}


def constraints(problem: Problem, bounds: Bounds) -> list[LinearConstraint]:
    """One-hot rows, tie rows and (scaled) budget rows within ``bounds``."""
    off = problem.offsets
    n_var, n_ops = int(off[-1]), len(problem.ops)
    rows, cols, vals = [], [], []
    for i in range(n_ops):  # sum_c x[i,c] = 1
        rows += [i] * (off[i + 1] - off[i])
        cols += list(range(off[i], off[i + 1]))
    vals = [1.0] * len(cols)
    r = n_ops
    pos = {name: i for i, name in enumerate(problem.ops)}
    for group in problem.ties:
        ref = pos[group[0]]
        levels = {problem.level(c) for o in group for c in problem.choices[pos[o]]}
        for other in group[1:]:
            j = pos[other]
            for level in sorted(levels, key=str):
                for op, sign in ((j, 1.0), (ref, -1.0)):
                    for c, cand in enumerate(problem.choices[op]):
                        if problem.level(cand) == level:
                            rows.append(r), cols.append(off[op] + c), vals.append(sign)
                r += 1
    eq = coo_array((vals, (rows, cols)), shape=(r, n_var)).tocsr()
    cons = [
        LinearConstraint(
            eq,
            np.r_[np.ones(n_ops), np.zeros(r - n_ops)],
            np.r_[np.ones(n_ops), np.zeros(r - n_ops)],
        )
    ]
    for b, (lo, hi) in bounds.items():  # widened by TOL: the exact check sorts them out
        row = np.concatenate(problem.costs[b])
        scale = row_scale(row, lo, hi)  # rows of order 1 for HiGHS
        cons.append(LinearConstraint(row[None] / scale, lo / scale - TOL, hi / scale + TOL))
    return cons


def row_scale(row: np.ndarray, lo: float, hi: float) -> float:
    """The largest magnitude among the finite bounds and the coefficients, else 1 (a tiny
    bound beside large coefficients would overflow the scaled row)."""
    finite = [abs(v) for v in (lo, hi) if math.isfinite(v)]
    return max(*finite, float(np.abs(row).max(initial=0.0))) or 1.0


def shifted_objective(problem: Problem, objective: np.ndarray) -> np.ndarray:
    """Per op, shift the coefficients so the smallest is 0 (one-hot rows make this an exact
    constant offset), then scale so the smallest positive gap is 1.

    Dividing by ``max|s|`` instead puts the differences that decide the optimum under
    HiGHS' absolute tolerances when sensitivities span many decades (issue 15 item 1).
    """
    off = problem.offsets
    out = np.asarray(objective, dtype=float).copy()
    for i in range(len(problem.ops)):
        block = out[off[i] : off[i + 1]]
        block -= block.min()
    gaps = out[out > 0]
    return out / np.median(gaps) if gaps.size else out


def solve_milp(problem: Problem, objective: np.ndarray, bounds: Bounds, cuts: list[np.ndarray]):
    """HiGHS with a zero MIP gap and tight tolerances; each cut is a 0/1 mask ``m`` over
    the variables with ``m . x <= n_ops - 1`` (see :func:`_cut`)."""
    cons = constraints(problem, bounds)
    off, n_ops = problem.offsets, len(problem.ops)
    if cuts:
        cons.append(LinearConstraint(np.array(cuts, dtype=float), -np.inf, n_ops - 1))
    options = {
        "mip_rel_gap": 0.0,
        "presolve": True,
        "mip_abs_gap": 0.0,
        "mip_feasibility_tolerance": TOL,
        "primal_feasibility_tolerance": TOL,
        "dual_feasibility_tolerance": TOL,
    }
    with warnings.catch_warnings():  # scipy warns that the tolerances go to HiGHS verbatim
        warnings.simplefilter("ignore", RuntimeWarning)
        return milp(
            shifted_objective(problem, objective),
            integrality=np.ones(int(off[-1])),
            bounds=(0, 1),
            constraints=cons,
            options=options,
        )


def exact_total(problem: Problem, kind: str, index: list[int]) -> Fraction:
    """Total of cost ``kind`` (or ``"sens"``) in exact rational arithmetic."""
    rows = problem.exact_sens if kind == "sens" else problem.exact[kind]
    return sum((rows[i][c] for i, c in enumerate(index)), Fraction(0))
