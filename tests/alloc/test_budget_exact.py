"""Budgets exact in both directions (issue 29): a plan whose exact rational cost equals
the budget is feasible, no plan exceeds a budget in rational arithmetic, and an
infeasibility message shows the real gap. The oracle enumerates every plan with the
cost models of :mod:`hawq.alloc.costs` evaluated in :class:`fractions.Fraction`
on the integer MACs / parameters / bits and the latency table's floats."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from hawq.alloc import (
    Candidate,
    InfeasibleBudget,
    LatencyTable,
    OpCost,
    Problem,
    allocate,
    read_hessian,
    solve,
)
from hawq.alloc.costs import GIGA, bops
from hawq.alloc.report import HessianReport, OpCurvature, synthetic_report
from hawq.alloc.ties import shared_input_groups
from hawq.io import write_json
from hawq.models import ViT

GRID = [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]
SEED_VIT = dict(image_size=32, patch_size=4, in_chans=3, num_classes=10, dim=512, depth=6,
                heads=8, mlp_dim=512, dropout=0.1)  # fmt: skip  (= conf/model/vit_cifar.yaml)


def _up(v: Fraction) -> float:
    """The smallest float >= ``v``."""
    f = float(v)
    return math.nextafter(f, math.inf) if Fraction(f) < v else f


def _down(v: Fraction) -> float:
    """The largest float <= ``v``."""
    f = float(v)
    return math.nextafter(f, -math.inf) if Fraction(f) > v else f


# ---------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def seed_vit(tmp_path_factory):
    """A synthetic hessian.json of the seed ViT (38 ops) and the model's shared-input tie
    groups (traced once: :func:`_alloc` passes them, so no call traces the model again)."""
    torch.manual_seed(0)
    model = ViT(**SEED_VIT).eval()
    path = tmp_path_factory.mktemp("seed_vit") / "hessian.json"
    write_json(path, synthetic_report(model, (3, 32, 32), seed=0))
    return read_hessian(path), shared_input_groups(model, (3, 32, 32))


def _alloc(seed_vit, cands: list, budgets: dict, **kw):
    """:func:`allocate` on the seed ViT, as with ``model=`` (same costs and ties)."""
    report, groups = seed_vit
    return allocate(report, cands, "uniform", budgets, ties=False, tie_groups=groups, **kw)


def _exact_total(alloc, kind: str) -> Fraction:
    p, s = alloc.problem, alloc.solution
    return sum((Fraction(float(p.costs[kind][i][c])) for i, c in enumerate(s.index)), Fraction(0))


def test_seed_vit_avg_bits_8_keeps_the_all_8_bit_plan(seed_vit):
    """All 8-bit costs exactly 8 average bits: the budget 8.0 admits it (objective 0)."""
    cands = [{"w_bits": 4, "a_bits": 8}, {"w_bits": 8, "a_bits": 8}]
    probe = _alloc(seed_vit, cands, {}, avg_bits_by="params")
    sens = [np.array([float(c.w_bits == 4) for c in ch]) for ch in probe.problem.choices]
    a = _alloc(seed_vit, cands, {"avg_bits": 8.0}, sens=sens, avg_bits_by="params")
    assert a.solution.objective == 0.0
    assert all(c.w_bits == 8 for c in a.chosen.values())
    assert a.solution.totals["avg_bits"] == 8.0


def test_seed_vit_avg_bits_4_takes_every_weight_at_4_bits(seed_vit):
    report = seed_vit[0]
    a = _alloc(seed_vit, GRID, {"avg_bits": 4.0}, avg_bits_by="params")
    p = a.problem
    best = 0.0  # matmuls carry no parameters: free; the others must take 4-bit weights
    for name, ch, s in zip(p.ops, p.choices, p.sens, strict=True):
        kind = report.ops[name].kind
        best += min(v for c, v in zip(ch, s, strict=True) if kind == "matmul" or c.w_bits == 4)
    assert a.solution.objective == pytest.approx(best, rel=1e-12)
    assert all(c.w_bits == 4 for n, c in a.chosen.items() if report.ops[n].kind != "matmul")
    assert a.solution.totals["avg_bits"] <= 4.0


def _report(ops: list[OpCost]) -> HessianReport:
    """A hessian report holding just what the cost models read (no curvature needed)."""
    entries = {}
    for op in ops:
        acts = ("a", "b") if op.kind == "matmul" else ("x",)
        ones = dict.fromkeys(acts, 1)
        entries[op.name] = OpCurvature(op.name, op.kind, op.params, op.macs, 1.0, None, ones, ones)
    return HessianReport("test", {}, entries)


def test_four_linear_ops_at_exactly_4_average_bits():
    ops = [OpCost(f"fc{i}", "linear", params=m, macs=m) for i, m in enumerate((6, 5, 6, 9))]
    a = allocate(_report(ops), GRID, "uniform", {"avg_bits": 4.0}, ties=False)
    assert all(c == Candidate(4, 4) for c in a.chosen.values())
    assert a.solution.totals["avg_bits"] == 4.0


def _all_4_bit_bops(report: HessianReport) -> tuple[float, Fraction]:
    """``np.sum`` of the per-op float BOPs of the all-4-bit plan, and its exact value."""
    ops = [OpCost(n, c.kind, c.numel, c.macs) for n, c in report.ops.items()]
    c4 = Candidate(4, 4)
    floats = np.array([bops(op, c4.for_kind(op.kind)) / GIGA for op in ops])
    return float(np.sum(floats)), sum((Fraction(op.macs * 16, 10**9) for op in ops), Fraction(0))


def test_bops_budget_at_the_float_sum_shows_the_real_gap(seed_vit):
    budget, exact = _all_4_bit_bops(seed_vit[0])
    assert Fraction(budget) < exact  # np.sum rounds 3e-15 below the true cost here
    with pytest.raises(InfeasibleBudget) as e:
        _alloc(seed_vit, GRID, {"bops": budget})
    msg = str(e.value)
    m = re.search(r"alloc\.bops=(\S+) is infeasible; the smallest feasible value is ([^ ;(]+)",
                  msg)  # fmt: skip
    assert m, msg
    assert float(m.group(1)) == budget  # the budget as given, to the last digit
    shown = float(m.group(2))
    assert shown > budget and Fraction(shown) >= exact, msg  # the gap is visible
    assert e.value.bounds["bops"] == _up(exact)
    for limit in (shown, _up(exact)):  # the printed value and the exact bound are feasible
        a = _alloc(seed_vit, GRID, {"bops": limit})
        assert all(max(c.operand_bits("linear")) == 4 for c in a.chosen.values())
        assert _exact_total(a, "bops") <= Fraction(limit)


def test_float_left_to_right_sum_does_not_reject_an_exact_plan():
    """0.3 + 0.5 + 0.3 + 0.6 is 1.7000000000000002 left to right; the exact sum of these
    four floats is below the float 1.7, so the zero-sensitivity plan meets ``bops=1.7``."""
    xs = [0.3, 0.5, 0.3, 0.6]
    assert sum(map(Fraction, xs)) <= Fraction(1.7) < Fraction(sum(xs))
    cands = [Candidate(4, 4), Candidate(8, 8)]
    p = Problem([f"op{i}" for i in range(4)], [cands] * 4, [np.array([1.0, 0.0])] * 4,
                {"bops": [np.array([0.0, x]) for x in xs]})  # fmt: skip
    sol = solve(p, {"bops": 1.7})
    assert sol.index == [1, 1, 1, 1] and sol.objective == 0.0
    assert sol.totals["bops"] <= 1.7


# ---------------------------------------------------------------- enumeration oracle

BITS = (2, 4, 8)
KINDS = [("avg_bits", "macs"), ("avg_bits", "params"), ("avg_bits", "ops"), ("bops", "macs"),
         ("size_mb", "macs"), ("latency_us", "macs"), ("int4_share", "macs")]  # fmt: skip


def _random_ops(rng: np.random.Generator) -> list[OpCost]:
    """1-6 ops; MACs and parameters drawn from a few values (equal-cost plans abound)."""
    out = []
    for i in range(int(rng.integers(1, 7))):
        kind = str(rng.choice(["linear", "linear", "conv2d", "matmul"]))
        macs = int(rng.choice([5, 6, 9, 12, 3 * 10**7, 2**20 + 1]))
        params = 0 if kind == "matmul" else int(rng.choice([6, 5, 10, 4096, 3 * 10**5 + 1]))
        out.append(OpCost(f"op{i}", kind, params, macs))
    return out


def _latency(rng: np.random.Generator, ops: list[OpCost], cands: list[Candidate]) -> LatencyTable:
    """Decimal latencies (0.1 steps: not binary fractions) for every op and setting."""
    keys = {c.for_kind(k).key for c in cands for k in ("linear", "matmul")}
    return LatencyTable({op.name: {k: round(float(rng.uniform(0.5, 9.5)), 1) for k in keys}
                         for op in ops})  # fmt: skip


def _cost(kind: str, by: str, op: OpCost, c: Candidate, ops: list[OpCost],
          table: LatencyTable) -> Fraction:  # fmt: skip
    """The cost models of :mod:`hawq.alloc.costs`, exactly."""
    w, a = c.operand_bits(op.kind)
    mm = op.kind == "matmul"
    if kind == "bops":
        return Fraction(op.macs * w * a, 10**9)
    if kind == "size_mb":
        return Fraction(0 if mm else op.params * w, 8 * 2**20)
    if kind == "int4_share":
        return Fraction(op.macs * (max(w, a) <= 4), sum(o.macs for o in ops))
    if kind == "latency_us":
        return Fraction(table.by_op[op.name][c.key])
    weight = {"macs": lambda o: o.macs, "params": lambda o: 0 if o.kind == "matmul" else o.params,
              "ops": lambda o: 1}[by]  # fmt: skip
    total = sum(weight(o) for o in ops)
    bits = Fraction(w) if by == "params" else Fraction(a if mm else Fraction(w + a, 2))
    return Fraction(weight(op), total) * bits if total else Fraction(0)


class Oracle:
    """Every plan's exact cost(s) and objective; ``best(budgets)`` is the true optimum."""

    def __init__(self, p: Problem, ops: list[OpCost], kinds: list[tuple[str, str]],
                 table: LatencyTable) -> None:  # fmt: skip
        self.plans = []
        for index in itertools.product(*(range(len(ch)) for ch in p.choices)):
            costs = {k: sum((_cost(k, by, op, p.choices[i][c], ops, table)
                             for i, (op, c) in enumerate(zip(ops, index, strict=True))),
                            Fraction(0)) for k, by in kinds}  # fmt: skip
            sens = sum((Fraction(float(p.sens[i][c])) for i, c in enumerate(index)), Fraction(0))
            self.plans.append((list(index), costs, sens))

    @staticmethod
    def meets(costs: dict[str, Fraction], budgets: dict[str, float]) -> bool:
        return all((costs[k] >= Fraction(v)) if k == "int4_share" else (costs[k] <= Fraction(v))
                   for k, v in budgets.items())  # fmt: skip

    def best(self, budgets: dict[str, float]) -> tuple[list[int], dict, Fraction] | None:
        ok = [q for q in self.plans if self.meets(q[1], budgets)]
        return min(ok, key=lambda q: q[2]) if ok else None

    def extreme(self, kind: str) -> Fraction:
        vals = [q[1][kind] for q in self.plans]
        return max(vals) if kind == "int4_share" else min(vals)

    def cost_of(self, index: list[int]) -> dict[str, Fraction]:
        return next(q[1] for q in self.plans if q[0] == index)


def _budgets_at(oracle: Oracle, rng: np.random.Generator, kinds: list[str]) -> list[dict]:
    """Budgets at a frontier plan's exact costs: the nearest float and both neighbours."""
    pick = int(rng.integers(len(oracle.plans)))
    target = oracle.plans[pick][1]
    if rng.random() < 0.25:  # the cheapest plan: just below it nothing is feasible
        target = {k: oracle.extreme(k) for k in kinds}
    front = oracle.best({k: _up(v) if k != "int4_share" else _down(v) for k, v in target.items()
                         if k in kinds})  # fmt: skip
    costs = (front or oracle.plans[0])[1]
    out = []
    for r in (float, _down, _up, _past):
        b = {k: r(costs[k], k) if r is _past else r(costs[k]) for k in kinds}
        if b not in out:
            out.append(b)
    return out


def _past(v: Fraction, kind: str) -> float:
    """The nearest float on the infeasible side of ``v`` (below it; above for a share)."""
    if kind == "int4_share":
        return math.nextafter(_down(v), math.inf)
    return math.nextafter(_up(v), -math.inf)


def _check(oracle: Oracle, budgets: dict, run) -> bool:
    """The allocator at ``budgets`` against enumeration; True when feasible."""
    truth = oracle.best(budgets)
    if truth is None:
        with pytest.raises(InfeasibleBudget) as e:
            run(budgets)
        if len(budgets) == 1:  # the bound: the exact extreme, rounded to the feasible side
            (k, v), = budgets.items()
            ext = oracle.extreme(k)
            bound = _down(ext) if k == "int4_share" else _up(ext)
            assert e.value.bounds[k] == bound, str(e.value)
        return False
    a = run(budgets)
    costs = oracle.cost_of(a.solution.index)
    assert Oracle.meets(costs, budgets), (budgets, costs)
    got = sum((Fraction(float(a.problem.sens[i][c])) for i, c in enumerate(a.solution.index)),
              Fraction(0))  # fmt: skip
    assert abs(got - truth[2]) <= abs(truth[2]) * Fraction(1, 10**12), (budgets, got, truth)
    for k, v in budgets.items():  # reported totals on the right side of the limit
        assert (a.solution.totals[k] >= v) if k == "int4_share" else (a.solution.totals[k] <= v)
    return True


def _trial(rng: np.random.Generator, seed: int, kinds: list[tuple[str, str]]) -> tuple[int, int]:
    ops = _random_ops(rng)
    cands = [Candidate(int(w), int(a)) for w, a in
             rng.permutation(list(itertools.product(BITS, BITS)))[: int(rng.integers(2, 4))]]
    table = _latency(rng, ops, cands)
    by = kinds[0][1]
    spec = [{"w_bits": c.w_bits, "a_bits": c.a_bits} for c in cands]

    def run(budgets: dict):
        return allocate(_report(ops), spec, "random", budgets, ties=False, latency=table,
                        avg_bits_by=by, seed=seed)  # fmt: skip

    oracle = Oracle(run({}).problem, ops, kinds, table)
    feasible = total = 0
    for budgets in _budgets_at(oracle, rng, [k for k, _ in kinds]):
        feasible += _check(oracle, budgets, run)
        total += 1
    return feasible, total


@pytest.mark.parametrize("kind,by", KINDS, ids=[f"{k}-{b}" for k, b in KINDS])
def test_allocator_matches_exact_enumeration_at_plan_costs(kind, by):
    rng = np.random.default_rng(KINDS.index((kind, by)))
    feasible = total = 0
    for trial in range(24):
        f, t = _trial(rng, trial, [(kind, by)])
        feasible, total = feasible + f, total + t
    assert total // 3 <= feasible < total  # both outcomes exercised


def test_two_budgets_at_a_plans_exact_costs():
    rng = np.random.default_rng(29)
    feasible = 0
    for trial in range(16):
        feasible += _trial(rng, trial, [("bops", "macs"), ("size_mb", "macs")])[0]
    assert feasible > 0


# ---------------------------------------------------------------- plateaus at a limit


def _plateau(n: int, extra: bool) -> tuple[Problem, float]:
    """``n`` ops costing exactly 0, 1 or 2 (sensitivity falling by 1 a unit, plus noise),
    the budget the float just below ``n``: every plan of total ``n`` misses it by 1 ulp,
    within HiGHS' tolerance, and beats every feasible plan. With ``extra`` an op whose
    second setting costs ``-2**-38`` makes those plans feasible at +0.5."""
    rng = np.random.default_rng(n)
    choices = [[Candidate(2, 8), Candidate(4, 8), Candidate(8, 8)]] * n
    sens = [np.array([2.0, 1.0, 0.0]) + rng.random(3) * 1e-3 for _ in range(n)]
    costs = [[Fraction(0), Fraction(1), Fraction(2)]] * n
    if extra:
        choices, sens = choices + [[Candidate(8, 8), Candidate(4, 8)]], sens + [np.array([0, 0.5])]
        costs = costs + [[Fraction(0), Fraction(-1, 2**38)]]
    p = Problem([f"op{i}" for i in range(len(choices))], choices, sens, {"size_mb": costs})
    return p, math.nextafter(float(n), 0.0)


def _truth(p: Problem, limit: float) -> Fraction:
    best = None
    for index in itertools.product(*(range(len(ch)) for ch in p.choices)):
        cost = sum((p.exact["size_mb"][i][c] for i, c in enumerate(index)), Fraction(0))
        if cost <= Fraction(limit):
            v = sum((Fraction(float(p.sens[i][c])) for i, c in enumerate(index)), Fraction(0))
            best = v if best is None or v < best else best
    return best


def test_plateau_beyond_the_cut_budget_is_searched_in_the_band(monkeypatch):
    """19 plans of total 4 beat every feasible plan; with 8 solves before the limits move
    inward the cuts do not settle it, and the optimum (one of those plans with the extra
    op at its negative cost) lies within the inward margin, in the band."""
    import hawq.alloc.exact as ilp

    calls = []
    near = ilp._near_limits
    monkeypatch.setattr(ilp, "_near_limits", lambda *a: calls.append(1) or near(*a))
    monkeypatch.setattr(ilp, "TRIES", 8)
    p, limit = _plateau(4, extra=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve(p, {"size_mb": limit})
    assert calls, "the plateau was settled by cuts alone: make it larger"
    assert ilp.exact_total(p, "size_mb", sol.index) <= Fraction(limit)
    assert ilp.exact_total(p, "sens", sol.index) == _truth(p, limit)
    assert sol.index[-1] == 1


def test_plateau_too_large_to_certify_warns_and_stays_feasible(monkeypatch):
    import hawq.alloc.exact as ilp

    monkeypatch.setattr(ilp, "TRIES", 4)  # 4 + 16 solves for 51 plans of total 5
    p, limit = _plateau(5, extra=False)
    with pytest.warns(RuntimeWarning, match="not certified"):
        sol = solve(p, {"size_mb": limit})
    assert ilp.exact_total(p, "size_mb", sol.index) <= Fraction(limit)
    got = ilp.exact_total(p, "sens", sol.index)
    assert got == _truth(p, limit)  # the best plan of total 4: nothing lies in between
