"""Bit allocation: Hessian sensitivity, cost models, an exact ILP and Pareto frontiers.

Typical use::

    from hawq.alloc import allocate, read_hessian
    alloc = allocate(read_hessian("hessian.json"), candidates=[{"w_bits": 4, "a_bits": 4}, ...],
                     method="hawq_v3_act", budgets={"bops": 12.0}, model=model,
                     calib_batches=loader)
    save_plan("bits.yaml", alloc.plan, alloc.meta)

``method="hawq_v3"`` is HAWQ-V3 exactly (weight-only objective, whole-layer ties, no
calibration images); ``hawq_v3_act`` is ours (plus activation terms, activation ties).
"""

from hawq.alloc.allocate import Allocation, allocate, build_problem, sensitivities, to_plan
from hawq.alloc.candidates import Candidate, parse_candidates
from hawq.alloc.costs import LatencyTable, OpCost, cost_arrays
from hawq.alloc.exact import extreme, solve
from hawq.alloc.ilp import BUDGET_KINDS, InfeasibleBudget, Problem, Solution
from hawq.alloc.oracle import brute_force, greedy
from hawq.alloc.pareto import FrontierPoint, frontier, pareto_filter, sweep
from hawq.alloc.report import HessianReport, OpCurvature, parse_hessian, read_hessian
from hawq.alloc.sensitivity import METHODS, SETTINGS
from hawq.alloc.ties import merge_groups, shared_input_groups

__all__ = [
    "BUDGET_KINDS",
    "METHODS",
    "SETTINGS",
    "Allocation",
    "Candidate",
    "FrontierPoint",
    "HessianReport",
    "InfeasibleBudget",
    "LatencyTable",
    "OpCost",
    "OpCurvature",
    "Problem",
    "Solution",
    "allocate",
    "brute_force",
    "build_problem",
    "cost_arrays",
    "extreme",
    "frontier",
    "greedy",
    "merge_groups",
    "parse_candidates",
    "parse_hessian",
    "pareto_filter",
    "read_hessian",
    "sensitivities",
    "shared_input_groups",
    "solve",
    "sweep",
    "to_plan",
]
