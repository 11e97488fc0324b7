"""Allocation time for the seed ViT (38 ops x 4 candidate settings): exact ILP vs greedy.

Usage::

    PYTHONPATH=. python benchmarks/bench_alloc.py [--repeats 5] [--out FILE]  # JSON on stdout

Builds the seed ViT (dim 512, depth 6; random weights: timing does not depend on
them) and a synthetic ``hessian.json`` for it, then measures

* ``alloc_s``: the whole allocation from ``hessian.json`` (read + validate, weight
  errors, costs, tie tracing, ILP, plan) with calibration passes excluded, per
  budget (issue target: < 1 s);
* the solver alone, ``scipy.optimize.milp`` (HiGHS) vs the named peer, a greedy
  HAWQ-V2-style heuristic (:func:`hawq.alloc.greedy`), on the same instances and
  budgets (brute force is out of reach: ~4^24 * 2^14 assignments), with the
  greedy's objective gap to the exact optimum (the greedy ignores ties, so both
  are compared on the untied instance; the tied ILP is timed too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hawq.alloc import Problem, allocate, greedy, read_hessian, solve
from hawq.alloc.report import synthetic_report
from hawq.io import write_json
from hawq.models import ViT

CANDIDATES = [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="also write the JSON here (default: stdout only, nothing in the cwd)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust on shared CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ViT(dropout=0.0).eval()  # the seed configuration: 38 quantizable ops
    calib = [(torch.randn(8, 3, 32, 32), None)]  # activation errors (timed separately)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hessian.json"
        write_json(path, synthetic_report(model, (3, 32, 32), seed=0))
        report = read_hessian(path)
        n_ops = len(report.ops)
        base = allocate(report, CANDIDATES, "hawq_v3", {}, model=model, calib_batches=calib,
                        max_batches=1)  # fmt: skip
        problem = base.problem
        untied = Problem(problem.ops, problem.choices, problem.sens, problem.costs, [])
        lo_bops = sum(float(c.min()) for c in problem.costs["bops"])
        hi_bops = sum(float(c.max()) for c in problem.costs["bops"])
        budgets = [{"bops": lo_bops + f * (hi_bops - lo_bops)} for f in (0.1, 0.3, 0.5, 0.7)]
        budgets += [{"int4_share": 0.9}, {"avg_bits": 5.0, "size_mb": 10.0}]
        rows = []
        for b in budgets:
            def full(b=b):
                return allocate(read_hessian(path), CANDIDATES, "hawq_v3", b, model=model,
                                calib_batches=calib, max_batches=1)  # fmt: skip

            _, alloc = _timed(full, 1)  # warm
            allocs = [full() for _ in range(args.repeats)]
            alloc_s = statistics.median(a.timings["alloc_s"] for a in allocs)
            calib_s = statistics.median(a.timings["calibration_s"] for a in allocs)
            milp_s, sol = _timed(lambda b=b: solve(problem, b), args.repeats)
            # the peer ignores ties: compare both on the untied instance
            free_s, free = _timed(lambda b=b: solve(untied, b), args.repeats)
            greedy_s, g = _timed(lambda b=b: greedy(untied, b), args.repeats)
            rows.append({
                "budgets": b, "alloc_s": alloc_s, "calibration_s_excluded": calib_s,
                "milp_s": milp_s, "milp_objective": sol.objective, "milp_status": sol.status,
                "untied_milp_s": free_s, "untied_milp_objective": free.objective,
                "greedy_s": greedy_s, "greedy_objective": None if g is None else g.objective,
                "greedy_gap": None if g is None else g.objective / free.objective - 1,
                "int4_share": sol.totals["int4_share"], "bops_G": sol.totals["bops"],
            })  # fmt: skip
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "alloc", "model": "ViT seed (dim 512, depth 6)", "ops": n_ops,
        "candidates": len(CANDIDATES),
        "variables": int(problem.offsets[-1]), "ties": problem.ties,
        "peer": "greedy (HAWQ-V2-style marginal sensitivity per cost; ignores ties)",
        "repeats": args.repeats, "threads": args.threads, "rows": rows,
        "max_alloc_s": max(r["alloc_s"] for r in rows),
        "platform": platform.platform(), "torch": torch.__version__,
        "numpy": np.__version__,
    }  # fmt: skip
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    print(f"max alloc_s {result['max_alloc_s']:.3f} s over {len(rows)} budgets")


if __name__ == "__main__":
    main()
