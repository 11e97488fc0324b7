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
re-checked in rational arithmetic (:func:`violation`): an assignment that HiGHS
accepted within its 1e-7 feasibility tolerance but that misses a budget exactly is
cut off and the solve repeated, so no plan exceeds any budget and the first exactly
feasible answer is optimal. :mod:`hawq.alloc.oracle` holds the brute-force test oracle and
the greedy HAWQ-V2-style baseline.
"""

from __future__ import annotations

import math
import time
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


@dataclass
class Problem:
    """One allocation instance.

    Attributes:
        ops: op names in network order.
        choices: per op, its candidate settings.
        sens: per op, sensitivity of each candidate (shape ``(len(choices[i]),)``).
        costs: budget kind -> per op, that cost of each candidate; totals add over ops.
        ties: groups of op names whose settings must be equal.
        tie_level: what a tie binds: ``activation`` (the activation bits and format:
            ops reading one tensor) or ``layer`` (the whole candidate, HAWQ-V3's ties).
    """

    ops: list[str]
    choices: list[list[Candidate]]
    sens: list[np.ndarray]
    costs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ties: list[list[str]] = field(default_factory=list)
    tie_level: str = "activation"

    def __post_init__(self) -> None:
        if self.tie_level not in ("activation", "layer"):
            raise HawqError(f"tie_level={self.tie_level!r} is invalid; allowed: activation, layer")
        n = len(self.ops)
        if len(self.choices) != n or len(self.sens) != n:
            raise ValueError("ops, choices and sens must have one entry per op")
        self.sens = [np.asarray(s, dtype=float) for s in self.sens]
        self.costs = {b: [np.asarray(c, dtype=float) for c in v] for b, v in self.costs.items()}
        for i, k in enumerate(self.choices):
            if not k:
                raise HawqError(f"op {self.ops[i]} has no candidate setting")
            arrays = [self.sens[i]] + [v[i] for v in self.costs.values()]
            if any(a.shape != (len(k),) for a in arrays):
                raise ValueError(f"op {self.ops[i]}: sensitivity/cost length != candidates")
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
        """Sum of cost ``kind`` (or ``"sens"``) over ops for one choice per op."""
        rows = self.sens if kind == "sens" else self.costs[kind]
        return float(sum(rows[i][c] for i, c in enumerate(index)))

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


class InfeasibleBudget(HawqError):
    """No allocation meets the budgets; ``bounds`` maps each binding budget to its limit."""

    def __init__(self, message: str, bounds: dict[str, float]) -> None:
        super().__init__(message)
        self.bounds = bounds


def _check_budgets(problem: Problem, budgets: dict[str, float]) -> dict[str, float]:
    out = {}
    for b, v in budgets.items():
        if v is None:
            continue
        if b not in problem.costs:
            raise HawqError(f"budget {b} has no cost model here; available: "
                            f"{choices(problem.costs)}")  # fmt: skip
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise HawqError(f"alloc.{b}={v!r} is invalid; allowed: a finite number or null")
        out[b] = float(v)
    return out


def _constraints(problem: Problem, budgets: dict[str, float]) -> list[LinearConstraint]:
    """One-hot rows, tie rows and (scaled) budget rows."""
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
    cons = [LinearConstraint(eq, np.r_[np.ones(n_ops), np.zeros(r - n_ops)],
                             np.r_[np.ones(n_ops), np.zeros(r - n_ops)])]  # fmt: skip
    for b, limit in budgets.items():
        row = np.concatenate(problem.costs[b])
        scale = abs(limit) or float(np.abs(row).max()) or 1.0  # rows of order 1 for HiGHS
        if b in LOWER_BOUNDS:
            cons.append(LinearConstraint(row[None] / scale, limit / scale, np.inf))
        else:
            cons.append(LinearConstraint(row[None] / scale, -np.inf, limit / scale))
    return cons


def _objective(problem: Problem, objective: np.ndarray) -> np.ndarray:
    """Per op, shift the coefficients so the smallest is 0 (one-hot rows make this an exact
    constant offset), then scale so the smallest positive gap is 1.

    Dividing by ``max|s|`` instead puts the differences that decide the optimum under
    HiGHS' absolute tolerances when sensitivities span many decades (issue 15 item 1).
    """
    off = problem.offsets
    out = np.asarray(objective, dtype=float).copy()
    for i in range(len(problem.ops)):
        block = out[off[i]:off[i + 1]]
        block -= block.min()
    gaps = out[out > 0]
    return out / np.median(gaps) if gaps.size else out


def _milp(problem: Problem, objective: np.ndarray, budgets: dict[str, float],
          cuts: list[list[int]] | None = None):  # fmt: skip
    """HiGHS with a zero MIP gap and tight tolerances; ``cuts`` exclude whole assignments
    (``sum_{i} x[i, index_i] <= n_ops - 1`` each)."""
    cons = _constraints(problem, budgets)
    off, n_ops = problem.offsets, len(problem.ops)
    if cuts:
        rows = np.zeros((len(cuts), int(off[-1])))
        for r, index in enumerate(cuts):
            rows[r, off[:-1] + np.asarray(index)] = 1.0
        cons.append(LinearConstraint(rows, -np.inf, n_ops - 1))
    options = {"mip_rel_gap": 0.0, "presolve": True, "mip_abs_gap": 0.0,
               "mip_feasibility_tolerance": 1e-9, "primal_feasibility_tolerance": 1e-9,
               "dual_feasibility_tolerance": 1e-9}  # fmt: skip
    with warnings.catch_warnings():  # scipy warns that the tolerances go to HiGHS verbatim
        warnings.simplefilter("ignore", RuntimeWarning)
        return milp(_objective(problem, objective), integrality=np.ones(int(off[-1])),
                    bounds=(0, 1), constraints=cons, options=options)  # fmt: skip


def exact_total(problem: Problem, kind: str, index: list[int]) -> Fraction:
    """:meth:`Problem.total` in exact rational arithmetic (every float is a rational)."""
    rows = problem.sens if kind == "sens" else problem.costs[kind]
    return sum((Fraction(float(rows[i][c])) for i, c in enumerate(index)), Fraction(0))


def violation(problem: Problem, budgets: dict[str, float], index: list[int]) -> dict[str, Fraction]:
    """Budget -> exact amount by which ``index`` misses it (only the missed ones); the
    float total :meth:`Problem.total` reports must not miss it either."""
    out = {}
    for b, limit in budgets.items():
        t, lim = exact_total(problem, b, index), Fraction(limit)
        miss = lim - t if b in LOWER_BOUNDS else t - lim
        f = problem.total(b, index)  # the reported total must be within the budget too
        f_miss = Fraction(limit - f if b in LOWER_BOUNDS else f - limit)
        if miss > 0 or f_miss > 0:
            out[b] = max(miss, f_miss)
    return out


def _exact_milp(problem: Problem, objective: np.ndarray, budgets: dict[str, float],
                max_cuts: int = 64) -> tuple[list[int] | None, str]:  # fmt: skip
    """Optimal assignment that meets every budget and tie *exactly*, or None.

    HiGHS accepts rows violated by up to its feasibility tolerance; such an assignment
    is cut off (no-good cut) and the solve repeated. HiGHS optimises over a superset
    of the exactly feasible set, so the first exactly feasible answer is optimal.
    After ``max_cuts`` cuts the violated budgets are tightened by their violation.
    """
    cuts: list[list[int]] = []
    limits = dict(budgets)
    for _ in range(4 * max_cuts):
        res = _milp(problem, objective, limits, cuts)
        if res.status == 2:
            return None, "infeasible"
        if not res.success or res.x is None:
            raise HawqError(f"the ILP solver failed: {res.message}")
        index = _index(problem, res.x)
        miss = violation(problem, budgets, index)
        if not miss and problem.ties_ok(index):
            return index, res.message
        if len(cuts) < max_cuts:
            cuts.append(index)
            continue
        for b, m in miss.items():  # a plateau of near-feasible plans: tighten instead
            step = float(m) * 2 + 1e-12 * max(1.0, abs(budgets[b]))
            limits[b] = limits[b] + step if b in LOWER_BOUNDS else limits[b] - step
        cuts.append(index)
    raise HawqError("the ILP solver kept returning plans that miss a budget by rounding; "
                    f"budgets {budgets}")


def _index(problem: Problem, x: np.ndarray) -> list[int]:
    off = problem.offsets
    return [int(np.argmax(x[off[i]:off[i + 1]])) for i in range(len(problem.ops))]


def _fmt(v: float, up: bool) -> str:
    """6 significant digits, rounded so the printed limit is still feasible."""
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v))) - 5
    q = v / 10.0**e
    q = math.ceil(q - 1e-9) if up else math.floor(q + 1e-9)
    return f"{q * 10.0**e:.6g}"


def extreme(problem: Problem, kind: str, budgets: dict[str, float | None] | None = None,
            maximize: bool = False) -> float | None:
    """Smallest (largest with ``maximize``) total of cost ``kind`` any allocation meeting
    ``budgets`` (exactly), ties and pins can reach; None when none meets them."""
    budgets = _check_budgets(problem, budgets or {})
    row = np.concatenate(problem.costs[kind])
    index, _ = _exact_milp(problem, -row if maximize else row, budgets)
    return None if index is None else problem.total(kind, index)


def _diagnose(problem: Problem, budgets: dict[str, float]) -> InfeasibleBudget:
    """Explain infeasibility: for each budget that cannot be met, its smallest (largest for
    a lower bound) feasible value given the other budgets, or on its own when the others
    cannot be met either."""
    if _exact_milp(problem, np.zeros(int(problem.offsets[-1])), {})[0] is None:
        return InfeasibleBudget("no allocation satisfies the tie groups and pins alone "
                                f"(ties: {problem.ties})", {})  # fmt: skip
    parts, bounds = [], {}
    for b, limit in budgets.items():
        others = {k: v for k, v in budgets.items() if k != b}
        lower = b in LOWER_BOUNDS
        best, where = extreme(problem, b, others, maximize=lower), "given the other budgets"
        if best is None:  # the others are infeasible too: this budget's bound on its own
            best, where = extreme(problem, b, {}, maximize=lower), "on its own"
        if best is None:
            continue
        if (best < limit) if lower else (best > limit):
            bounds[b] = best
            word = "largest" if lower else "smallest"
            ctx = f" ({where}, ties and pins)" if others or problem.ties else ""
            parts.append(f"alloc.{b}={limit:.6g} is infeasible; the {word} feasible value "
                         f"is {_fmt(best, up=not lower)}{ctx}")  # fmt: skip
    if not parts:  # each budget is met given the others' bounds on their own: name them all
        for b in budgets:
            lower = b in LOWER_BOUNDS
            best = extreme(problem, b, {}, maximize=lower)
            if best is not None:
                bounds[b] = best
                parts.append(f"alloc.{b} {'<=' if lower else '>='} {_fmt(best, up=not lower)}"
                             " on its own")  # fmt: skip
        msg = f"budgets {budgets} are jointly infeasible; feasible alone: " + ", ".join(parts)
        return InfeasibleBudget(msg, bounds)
    return InfeasibleBudget("; ".join(parts), bounds)


def solve(problem: Problem, budgets: dict[str, float | None] | None = None) -> Solution:
    """Minimise total sensitivity under ``budgets`` (kind -> limit; None = off).

    The returned plan meets every budget exactly (checked in rational arithmetic) and
    is optimal whatever the sensitivities' dynamic range (see :func:`_objective`).

    Raises:
        InfeasibleBudget: no allocation meets them; the message names, for each
            budget that cannot be met, the smallest (largest for ``int4_share``)
            feasible value.
    """
    budgets = _check_budgets(problem, budgets or {})
    start = time.perf_counter()
    index, status = _exact_milp(problem, np.concatenate(problem.sens), budgets)
    elapsed = time.perf_counter() - start
    if index is None:
        raise _diagnose(problem, budgets)
    totals = {b: problem.total(b, index) for b in problem.costs}
    return Solution(index, problem.total("sens", index), totals, status, elapsed)
