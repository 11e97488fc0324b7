"""``python -m hawq.report``: results tables, budgets, trade-off plots, published artifacts.

    python -m hawq.report table experiments/vit_cifar/rows.yaml --runs runs
    python -m hawq.report budget runs/resnet20_cifar/hessian.json --kind bops --fraction 0.5 \\
        --pin-first 8 --pin-last 8
    python -m hawq.report tradeoff "hawq_v3=runs/share_*" "uniform=runs/w*a*" --stage qat \\
        --cost bops --out pareto.png
    python -m hawq.report publish <run_dir> <dest> / verify <rows.yaml>
"""

from __future__ import annotations

import argparse
import os
import sys

from hawq.errors import HawqError
from hawq.report.budgets import budget_at, budget_range, parse_pin, tradeoff_points
from hawq.report.tables import load_rows, results_table

DESCRIPTION = "Results tables built from run directories, and budgets as fractions of their range."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hawq.report", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="Markdown results table from rows.yaml and run directories")
    t.add_argument("rows")
    t.add_argument("--runs", default="runs", help="root of the run directories")
    b = sub.add_parser("budget", help="a budget at a fraction of its [min, max] range")
    b.add_argument("hessian")
    b.add_argument("--kind", default="bops", choices=("bops", "size_mb"))
    b.add_argument("--fraction", type=float, required=True)
    b.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[4, 8],
        help="candidate widths (every w x a combination)",
    )
    b.add_argument("--pin-first", help="first op's fixed bits (8 or W,A): excluded from the range")
    b.add_argument("--pin-last", help="last op's fixed bits (8 or W,A): excluded from the range")
    b.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="OP=BITS",
        help="an op's fixed bits (repeatable): excluded from the range",
    )
    v = sub.add_parser("verify", help="re-evaluate the published checkpoints of rows.yaml")
    v.add_argument("rows")
    v.add_argument("--data", help="CIFAR-10 folder (default: HAWQ_DATA or the run's data.root)")
    v.add_argument("--tol", type=float, default=0.05, help="allowed |difference| in points")
    pb = sub.add_parser("publish", help="copy a run's results.json and checkpoint to a folder")
    pb.add_argument("run_dir")
    pb.add_argument("dest")
    pb.add_argument(
        "--checkpoint", default="model.pt", help="checkpoint to copy; 'none': results only"
    )
    d = sub.add_parser("tradeoff", help="accuracy vs BOPs/size PNG over finished ptq/qat runs")
    d.add_argument("series", nargs="+", help="LABEL=GLOB of run directories, one per line")
    d.add_argument("--stage", default="ptq", choices=("ptq", "qat"))
    d.add_argument("--cost", default="bops", choices=("bops", "size_mb", "int4_share"))
    d.add_argument("--out", default="tradeoff.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "table": _table,
        "tradeoff": _tradeoff,
        "budget": _budget,
        "verify": _artifacts,
        "publish": _artifacts,
    }
    try:
        return commands[args.cmd](args)
    except HawqError as e:
        print(f"hawq: error: {e}", file=sys.stderr)
        return e.exit_code


def _table(args: argparse.Namespace) -> int:
    sys.stdout.write(results_table(load_rows(args.rows), args.runs))
    return 0


def _tradeoff(args: argparse.Namespace) -> int:
    from hawq.viz.report import plot_tradeoff

    series, ref = {}, {}
    for item in args.series:
        label, _, pattern = item.rpartition("=")
        series[label or pattern], fp = tradeoff_points([pattern], args.stage, args.cost)
        if fp is not None:
            ref["FP"] = fp
    if not any(series.values()):
        raise HawqError(f"no finished {args.stage} run matches {' '.join(args.series)}")
    xlabel = {"bops": "GBOPs / image", "size_mb": "size (MB)", "int4_share": "INT4 share of MACs"}[
        args.cost
    ]
    title = f"{args.stage} accuracy vs {args.cost}"
    print(plot_tradeoff(series, xlabel, args.out, reference=ref, title=title))
    return 0


def _budget(args: argparse.Namespace) -> int:
    cands = [{"w_bits": w, "a_bits": a} for w in args.bits for a in args.bits]
    pins = {}
    for item in args.pin:
        op, sep, bits = item.partition("=")
        if not sep:
            raise HawqError(f"--pin {item!r} is invalid; allowed: OP=BITS or OP=W,A")
        pins[op] = parse_pin(bits)
    first = parse_pin(args.pin_first) if args.pin_first else None
    last = parse_pin(args.pin_last) if args.pin_last else None
    lo, hi = budget_range(args.hessian, cands, args.kind, pins, first, last)
    print(repr(budget_at(lo, hi, args.fraction)))  # all digits: B(0) stays feasible
    return 0


def _artifacts(args: argparse.Namespace) -> int:

    from hawq import artifacts

    if args.cmd == "publish":
        ckpt = None if args.checkpoint.lower() == "none" else args.checkpoint
        print(artifacts.publish(args.run_dir, args.dest, ckpt))
        return 0
    checks = artifacts.verify(load_rows(args.rows), args.data or os.environ.get("HAWQ_DATA"))
    bad = [c for c in checks if abs(c.diff) > args.tol]
    print(
        f"verify: {len(checks)} published checkpoint(s), {len(bad)} off by more than "
        f"{args.tol} points"
    )
    for c in bad:
        print(f"  {c.label}: published {c.published:.2f}, measured {c.measured:.2f}")
    if not checks:
        raise HawqError(f"{args.rows}: no row names an artifact")
    return 1 if bad else 0
