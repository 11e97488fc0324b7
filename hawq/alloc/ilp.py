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
checked in rational arithmetic (:func:`violation`): every cost is an exact rational
(the cost models' formulas on integer MACs, parameters and bits, see
:func:`hawq.alloc.costs.exact_costs`; a float input is the binary rational it holds), a
plan meets a budget when its exact total is at most (at least) the budget's float, so a
plan whose cost equals the budget is feasible, and no float rounding of a sum decides
anything. HiGHS accepts rows violated by up to its ~1e-9 feasibility tolerance; such a
plan is cut off (:func:`_cut`) and the solve repeated, so the first exactly feasible
answer is optimal. When plans within the tolerance keep coming, every limit is moved
inward by a margin HiGHS cannot cross and the bands between the moved and the true
limits are searched on their own (:func:`_near_limits`). :mod:`hawq.alloc.oracle` holds
the brute-force test oracle and the greedy HAWQ-V2-style baseline.
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
# HiGHS' feasibility tolerances, and how far each (scaled) budget row is widened for it:
# its presolve declares a model infeasible when the cheapest plan's cost equals the
# limit up to one ulp, so a plan exactly at a limit must lie strictly inside the row.
TOL = 1e-9
TRIES = 64  # solves before the limits move inward (:func:`_near_limits`; 4x as many there)


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
        self.exact = {b: [[_rational(x) for x in c] for c in v] for b, v in raw.items()}
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


def _rational(x: object) -> Fraction:
    """A cost entry as a rational: a Fraction or int as it is, anything else via float."""
    return x if isinstance(x, Fraction) else Fraction(x if isinstance(x, int) else float(x))


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
            raise HawqError(
                f"budget {b} has no cost model here; available: {choices(problem.costs)}"
            )
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise HawqError(f"alloc.{b}={v!r} is invalid; allowed: a finite number or null")
        out[b] = float(v)
    return out


Bounds = dict[str, tuple[float, float]]  # budget kind -> (lo, hi) of its row for HiGHS


def _sides(budgets: dict[str, float]) -> Bounds:
    """Each budget as row bounds: ``[B, inf)`` for a lower budget, ``(-inf, B]`` otherwise."""
    return {b: (v, math.inf) if b in LOWER_BOUNDS else (-math.inf, v) for b, v in budgets.items()}


def _constraints(problem: Problem, bounds: Bounds) -> list[LinearConstraint]:
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
        scale = _scale(row, lo, hi)  # rows of order 1 for HiGHS
        cons.append(LinearConstraint(row[None] / scale, lo / scale - TOL, hi / scale + TOL))
    return cons


def _scale(row: np.ndarray, lo: float, hi: float) -> float:
    """The largest magnitude among the finite bounds and the coefficients, else 1 (a tiny
    bound beside large coefficients would overflow the scaled row)."""
    finite = [abs(v) for v in (lo, hi) if math.isfinite(v)]
    return max(*finite, float(np.abs(row).max(initial=0.0))) or 1.0


def _objective(problem: Problem, objective: np.ndarray) -> np.ndarray:
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


def _milp(problem: Problem, objective: np.ndarray, bounds: Bounds, cuts: list[np.ndarray]):
    """HiGHS with a zero MIP gap and tight tolerances; each cut is a 0/1 mask ``m`` over
    the variables with ``m . x <= n_ops - 1`` (see :func:`_cut`)."""
    cons = _constraints(problem, bounds)
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
            _objective(problem, objective),
            integrality=np.ones(int(off[-1])),
            bounds=(0, 1),
            constraints=cons,
            options=options,
        )


def exact_total(problem: Problem, kind: str, index: list[int]) -> Fraction:
    """Total of cost ``kind`` (or ``"sens"``) in exact rational arithmetic."""
    rows = problem.exact_sens if kind == "sens" else problem.exact[kind]
    return sum((rows[i][c] for i, c in enumerate(index)), Fraction(0))


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
        res = _milp(problem, objective, bounds, cuts)
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
    return 1e-7 * (_scale(row, limit, limit) + float(np.abs(row).sum()))


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
    best, done, status = _search(problem, objective, budgets, _sides(inward), cuts, tries)
    if not done:
        raise HawqError(
            "the ILP solver returns plans that miss a budget even with every "
            f"limit moved inward (to {inward}); budgets {budgets}"
        )
    for b, v in budgets.items():
        band = {**_sides(budgets), b: (v, inward[b]) if b in LOWER_BOUNDS else (inward[b], v)}
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
    index, done, status = _search(problem, objective, budgets, _sides(budgets), cuts, TRIES)
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
    budgets = _check_budgets(problem, budgets or {})
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
    and is optimal whatever the sensitivities' dynamic range (see :func:`_objective`).
    Its reported totals are the exact ones correctly rounded, so within the limits too.

    Raises:
        InfeasibleBudget: no allocation meets them; the message names, for each
            budget that cannot be met, the smallest (largest for ``int4_share``)
            feasible value, with the digits that show the gap.
    """
    budgets = _check_budgets(problem, budgets or {})
    start = time.perf_counter()
    index, status = _exact_milp(problem, np.concatenate(problem.sens), budgets)
    elapsed = time.perf_counter() - start
    if index is None:
        raise _diagnose(problem, budgets)
    totals = {b: problem.total(b, index) for b in problem.costs}
    return Solution(index, problem.total("sens", index), totals, status, elapsed)
