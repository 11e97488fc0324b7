"""The ILP against brute-force enumeration, budgets, ties, pins and infeasibility messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.alloc import (
    Candidate,
    InfeasibleBudget,
    Problem,
    brute_force,
    extreme,
    frontier,
    greedy,
    solve,
    sweep,
)
from hawq.errors import HawqError

from .cases import random_budgets, random_problem

TOL = 1e-7  # HiGHS' primal feasibility tolerance (rows are scaled to ~1)


def _check_against_brute_force(p: Problem, budgets: dict[str, float]) -> bool:
    """Same optimum value as enumeration, or both infeasible; True when feasible."""
    bf = brute_force(p, budgets)
    try:
        sol = solve(p, budgets)
    except InfeasibleBudget:
        assert bf is None, f"ILP says infeasible, enumeration found {bf.objective}"
        return False
    assert bf is not None, "ILP found a solution enumeration says is infeasible"
    assert sol.objective == pytest.approx(bf.objective, rel=1e-9, abs=1e-12)
    for b, limit in budgets.items():  # budgets respected (up to the solver tolerance)
        t = sol.totals[b]
        assert (t >= limit - TOL * max(1, abs(limit))) if b == "int4_share" else \
            (t <= limit + TOL * max(1, abs(limit)))
    assert p.ties_ok(sol.index)
    return True


def test_ilp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(1234)
    feasible = 0
    for trial in range(150):
        p = random_problem(rng, int(rng.integers(1, 7)), ties=trial % 2 == 0)
        feasible += _check_against_brute_force(p, random_budgets(rng, p))
    assert 30 < feasible < 150  # both outcomes exercised


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_ops=st.integers(1, 6), ties=st.booleans())
def test_ilp_equals_brute_force_property(seed, n_ops, ties):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n_ops, ties)
    _check_against_brute_force(p, random_budgets(rng, p))


def test_no_budget_picks_each_ops_least_sensitive_candidate():
    p = random_problem(np.random.default_rng(0), 6)
    sol = solve(p, {"bops": None})
    assert sol.index == [int(np.argmin(s)) for s in p.sens]


def test_ties_force_equal_activation_bits():
    a4, a8 = Candidate(8, 4), Candidate(8, 8)
    # op0 prefers a4 a lot, op1 prefers a8 a little: tied, both take a4
    p = Problem(["op0", "op1"], [[a4, a8], [a4, a8]], [np.array([0.0, 10.0]), np.array([1.0, 0.0])],
                {"bops": [np.array([1.0, 2.0])] * 2}, [["op0", "op1"]])  # fmt: skip
    sol = solve(p)
    assert sol.chosen(p) == {"op0": a4, "op1": a4}
    untied = Problem(p.ops, p.choices, p.sens, p.costs, [])
    assert solve(untied).chosen(untied) == {"op0": a4, "op1": a8}


def test_ties_between_ops_with_different_candidate_lists():
    # op1 (a matmul) cannot take a4: the tie then forbids a4 for op0 too
    p = Problem(["op0", "op1"], [[Candidate(4, 4), Candidate(4, 8)], [Candidate(8, 8)]],
                [np.array([0.0, 5.0]), np.array([0.0])], {}, [["op0", "op1"]])  # fmt: skip
    assert solve(p).index == [1, 0]


def test_infeasible_budget_names_smallest_feasible_value():
    rng = np.random.default_rng(7)
    for _ in range(20):
        p = random_problem(rng, 4, ties=True)
        smallest = min(p.total("bops", list(ix)) for ix in np.ndindex(*[len(c) for c in p.choices])
                       if p.ties_ok(list(ix)))  # fmt: skip
        with pytest.raises(InfeasibleBudget) as e:
            solve(p, {"bops": smallest * 0.99})
        m = re.search(r"alloc\.bops=\S+ is infeasible; the smallest feasible value is (\S+)",
                      str(e.value))  # fmt: skip
        assert m, str(e.value)
        assert e.value.bounds["bops"] == pytest.approx(smallest, rel=1e-9)
        printed = float(m.group(1).rstrip(" ("))
        assert smallest <= printed <= smallest * (1 + 1e-5)  # rounded up: still feasible
        solve(p, {"bops": printed})  # the printed value works


def test_infeasible_lower_bound_names_largest_feasible_share():
    p = random_problem(np.random.default_rng(3), 5)
    largest = extreme(p, "int4_share", {}, maximize=True)
    with pytest.raises(InfeasibleBudget, match="the largest feasible value is") as e:
        solve(p, {"int4_share": largest + 0.01})
    assert e.value.bounds["int4_share"] == pytest.approx(largest)


def test_infeasible_combination_is_explained_given_the_other_budget():
    p = random_problem(np.random.default_rng(11), 5)
    size_min = extreme(p, "size_mb")
    bops_at_min_size = extreme(p, "bops", {"size_mb": size_min})
    with pytest.raises(InfeasibleBudget, match="given the other budgets") as e:
        solve(p, {"size_mb": size_min, "bops": bops_at_min_size * 0.999})
    assert e.value.bounds["bops"] == pytest.approx(bops_at_min_size)


def test_contradictory_ties_are_reported():
    p = Problem(["op0", "op1"], [[Candidate(4, 4)], [Candidate(8, 8)]],
                [np.zeros(1), np.zeros(1)], {}, [["op0", "op1"]])  # fmt: skip
    with pytest.raises(InfeasibleBudget, match="tie groups and pins alone"):
        solve(p)


def test_unknown_budget_and_bad_values_are_errors():
    p = random_problem(np.random.default_rng(0), 3)
    with pytest.raises(HawqError, match="budget latency_us has no cost model"):
        solve(p, {"latency_us": 5.0})
    with pytest.raises(HawqError, match="alloc.bops=inf is invalid"):
        solve(p, {"bops": float("inf")})


def test_greedy_is_never_better_than_the_ilp():
    rng = np.random.default_rng(5)
    worse = 0
    for _ in range(40):
        p = random_problem(rng, 6)
        b = {"bops": random_budgets(rng, p).get("bops", 150.0)}
        g = greedy(p, b)
        try:
            s = solve(p, b)
        except InfeasibleBudget:
            assert g is None
            continue
        if g is not None:
            assert g.totals["bops"] <= b["bops"] + 1e-9
            assert s.objective <= g.objective + 1e-12
            worse += g.objective > s.objective + 1e-12
    assert worse > 0  # the heuristic is a real (suboptimal) peer


def test_frontier_is_monotone_and_matches_pointwise_solves():
    p = random_problem(np.random.default_rng(2), 6)
    pts = frontier(p, "bops", n=10)
    assert len(pts) >= 2
    costs = [q.cost for q in pts]
    objs = [q.objective for q in pts]
    assert costs == sorted(costs) and all(a > b for a, b in zip(objs, objs[1:], strict=False))
    for q in pts:
        assert q.cost <= q.budget + 1e-9
        assert q.objective == pytest.approx(brute_force(p, {"bops": q.budget}).objective)
    infeasible = sweep(p, "bops", [costs[0] * 0.5])
    assert infeasible[0].objective is None
