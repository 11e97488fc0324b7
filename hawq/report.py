"""Results tables built from run directories, and budgets as fractions of their range.

A table is described by *rows* (a YAML list, e.g. ``experiments/vit_cifar/rows.yaml``)::

    - label: FP
      runs: [vit_cifar, vit_cifar_s*]  # run directories under the runs root (globs), one per seed
      metric: stages.evaluate.fp.acc   # dotted path into each run's results.json
      command: python -m hawq.run experiment=vit_cifar seed=0,1,2 -m

:func:`results_table` reads every matching ``results.json`` and writes one
Markdown row per entry: the mean (and, for >= 2 runs, the sample standard
deviation) of the metric, the number of runs, the command, the commits and the
hardware from the runs' provenance. A row with no finished run reads
``to run``, so numbers are never typed by hand.

:func:`budget_range` gives the HAWQ-V3 budget parametrisation: with per-op
candidate settings, a budget is :math:`B(f) = B_{min} + f\\,(B_{max} - B_{min})`
where :math:`B_{min}` / :math:`B_{max}` are the totals with every op the ILP decides
at its cheapest / dearest candidate and every pinned op at its pin (``size_mb`` or
``bops``; costs are separable per op, so these are the exact extremes without ties):
the fraction runs over the decided ops only, as in HAWQ-V3, whose first and last
layers are fixed at 8 bits.

Notebooks run or load a run with :func:`run_stages`. Command line::

    python -m hawq.report table experiments/vit_cifar/rows.yaml --runs runs
    python -m hawq.report budget runs/resnet20_cifar/hessian.json --kind bops --fraction 0.5 \
        --pin-first 8 --pin-last 8
    python -m hawq.report tradeoff "hawq_v3=runs/share_*" "uniform=runs/w*a*" --stage qat \
        --cost bops --out pareto.png

:func:`tradeoff_points` gives the accuracy-vs-cost points of finished ``ptq``/``qat``
runs (e.g. a Hydra multirun over budgets): the cost is recomputed from the plan the
stage actually applied (``<stage>_bits.yaml``) and the FP model's op inventory, so
uniform baselines and allocated plans share one axis.
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from hawq.errors import HawqError
from hawq.io import read_json, read_yaml

RESULTS = "results.json"


@dataclass
class Row:
    """One table row: a metric over the runs whose directories match ``runs``."""

    label: str
    runs: str | list[str]  # glob(s) of run directories under the runs root
    metric: str
    command: str = ""
    scale: float = 1.0  # e.g. 100 for a share stored as a fraction
    digits: int = 2
    note: str = ""
    artifact: str = ""  # published folder (results.json + checkpoint): hawq.artifacts
    extra: dict[str, Any] = field(default_factory=dict)


def lookup(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"][0]`` for ``"a.b.0"``; None when any step is missing."""
    for key in dotted.split("."):
        if isinstance(obj, Mapping) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.lstrip("-").isdigit() and abs(int(key)) < len(obj):
            obj = obj[int(key)]
        else:
            return None
    return obj


def load_rows(path: str | Path) -> list[Row]:
    """Rows from a YAML list of mappings (keys of :class:`Row`)."""
    data = read_yaml(path)
    if not isinstance(data, list):
        raise HawqError(f"{path}: expected a list of rows")
    rows = []
    for i, entry in enumerate(data):
        try:
            rows.append(Row(**entry))
        except TypeError as e:
            raise HawqError(f"{path}: row {i}: {e}") from e
    return rows


@dataclass
class Cell:
    """The aggregated value of one row."""

    values: list[float]
    commits: list[str]
    hardware: list[str]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


def collect(row: Row, runs_root: str | Path) -> Cell:
    """The metric of every finished run matching ``row.runs`` (sorted by directory)."""
    values, commits, hardware = [], [], []
    pats = [row.runs] if isinstance(row.runs, str) else list(row.runs)
    dirs = sorted({d for pat in pats for d in glob.glob(str(Path(runs_root) / pat))})
    for d in dirs:
        path = Path(d) / RESULTS
        if not path.is_file():
            continue
        res = read_json(path)
        v = lookup(res, row.metric)
        if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        values.append(float(v) * row.scale)
        prov = res.get("provenance", {})
        git = str(prov.get("git") or "?")
        commits.append(git[:7] + ("+dirty" if git.endswith("+dirty") else ""))
        hardware.append(str(prov.get("hardware") or "?"))
    return Cell(values, commits, hardware)


def _fmt(cell: Cell, digits: int) -> str:
    if not cell.values:
        return "to run"
    s = f"{cell.mean:.{digits}f}"
    if cell.std is not None and not math.isnan(cell.std):
        s += f" ± {cell.std:.{digits}f}"
    return s


def _uniq(xs: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(xs)) or "-"


def results_table(rows: Sequence[Row], runs_root: str | Path) -> str:
    """A Markdown table: label, value (mean ± std over runs), runs, command, commit, hardware."""
    lines = [
        "| row | value | runs | command | commit | hardware |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cell = collect(row, runs_root)
        label = row.label + (f" ({row.note})" if row.note else "")
        cmd = f"`{row.command}`" if row.command else "-"
        lines.append(
            f"| {label} | {_fmt(cell, row.digits)} | {len(cell.values)} | {cmd} | "
            f"{_uniq(cell.commits)} | {_uniq(cell.hardware)} |"
        )
    return "\n".join(lines) + "\n"


def budget_range(
    hessian_json: str | Path,
    candidates: Sequence[Mapping[str, Any]],
    kind: str,
    pins: Mapping[str, Any] | None = None,
    pin_first: Any = None,
    pin_last: Any = None,
) -> tuple[float, float]:
    """``(B_min, B_max)`` of ``kind`` (``size_mb`` or ``bops``) over the ops the ILP decides.

    Pinned ops (``pins``, ``pin_first``, ``pin_last``, as in ``cfg.alloc``) have one
    setting, so they add the same constant to both ends: ``B(f)`` moves only over the
    decided ops (HAWQ-V3 fixes the first and last layer at 8 bits and takes the range
    over the others), and ``B(0)`` is the cheapest plan the pins allow, always feasible.
    Units as in :mod:`hawq.alloc.costs`: ``size_mb`` MB, ``bops`` G bit-ops per image.
    """
    from hawq.alloc import read_hessian
    from hawq.alloc.allocate import choices_per_op, resolve_pins
    from hawq.alloc.costs import OpCost, exact_bops, exact_size_mb

    fns = {"size_mb": exact_size_mb, "bops": exact_bops}  # the allocator's exact costs
    if kind not in fns:
        raise HawqError(f"budget kind {kind!r} is invalid; allowed: {', '.join(fns)}")
    report = read_hessian(hessian_json)
    pinned = resolve_pins(list(report.ops), pins, pin_first, pin_last)
    per_op = choices_per_op(report, candidates, pinned)
    lo = hi = Fraction(0)  # exact sums, rounded up: B(0) and B(1) are feasible exactly
    for (name, op), cands in zip(report.ops.items(), per_op, strict=True):
        cost = OpCost(name, op.kind, op.numel, op.macs)
        vals = [fns[kind](cost, c) for c in cands]
        lo += min(vals)
        hi += max(vals)
    return _up(lo), _up(hi)


def _up(v: Fraction) -> float:
    """The smallest float >= ``v``."""
    f = float(v)
    return math.nextafter(f, math.inf) if Fraction(f) < v else f


def _pin(text: str) -> dict[str, int]:
    """``8`` -> w8a8, ``4,8`` -> w4a8 (the CLI's pin syntax)."""
    try:
        bits = [int(v) for v in text.split(",")]
    except ValueError:
        bits = []
    if len(bits) not in (1, 2):
        raise HawqError(f"pin {text!r} is invalid; allowed: BITS or W_BITS,A_BITS (e.g. 8 or 4,8)")
    return {"w_bits": bits[0], "a_bits": bits[-1]}


def budget_at(lo: float, hi: float, fraction: float) -> float:
    """:math:`B_{min} + f (B_{max} - B_{min})` for ``0 <= f <= 1`` (``B(0) = B_min`` and
    ``B(1) = B_max`` exactly)."""
    if not 0.0 <= fraction <= 1.0:
        raise HawqError(f"fraction={fraction} is invalid; allowed: 0 <= fraction <= 1")
    return hi if fraction == 1.0 else lo + fraction * (hi - lo)


def compose_config(overrides: Sequence[str] = (), run_dir: str | Path | None = None):
    """The config the CLI would build from ``overrides`` (``paths.run_dir`` set when given)."""
    from hydra import compose, initialize_config_dir

    from hawq.run import CONF_DIR

    extra = [f"paths.run_dir={Path(run_dir).expanduser().resolve()}"] if run_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


def run_stages(
    overrides: Sequence[str], stages: Sequence[str], run_dir: str | Path | None = None
) -> tuple[dict, Path]:
    """Run ``stages`` like ``python -m hawq.run OVERRIDES stages=[...]`` (for notebooks).

    Stages whose outputs exist are skipped, so pointing ``run_dir`` at a finished
    run only loads it. Returns ``(results.json contents, run directory)``.
    """
    from hawq.pipeline import run_pipeline

    cfg = compose_config([*overrides, f"stages=[{','.join(stages)}]"], run_dir)
    results = run_pipeline(cfg)
    return results, Path(cfg.paths.run_dir).expanduser().resolve()


def plan_costs(
    plan_path: str | Path, checkpoint: str | Path, input_size: tuple[int, ...] = (3, 32, 32)
) -> dict[str, float]:
    """Size (MB), GBOPs per image and INT4 MAC share of the plan at ``plan_path``.

    ``BOPs = sum_l MACs_l * b_w * b_a`` (an FP operand counts 32 bits), size
    ``= sum_l params_l * b_w / 8 / 2^20``; both from :mod:`hawq.alloc.costs`.
    """
    from hawq.alloc.candidates import Candidate
    from hawq.alloc.costs import OpCost, bops, int4_macs, size_mb
    from hawq.checkpoint import load_model
    from hawq.models.ops import op_inventory
    from hawq.quant.plan import load_plan

    plan, _ = load_plan(plan_path)
    model, _ = load_model(checkpoint)
    out = {"size_mb": 0.0, "bops": 0.0, "int4_macs": 0.0, "macs": 0.0}
    for info in op_inventory(model, input_size):
        st = plan.setting(info.name)
        op = OpCost(info.name, info.kind, info.params, info.macs)
        c = Candidate(st.w_bits, st.a_bits, st.w_format, st.a_format)
        out["size_mb"] += size_mb(op, c)
        out["bops"] += bops(op, c) / 1e9
        out["int4_macs"] += int4_macs(op, c)
        out["macs"] += info.macs
    out["int4_share"] = out.pop("int4_macs") / max(out.pop("macs"), 1.0)
    return out


def tradeoff_points(
    run_globs: Sequence[str], stage: str = "ptq", cost: str = "bops"
) -> tuple[list[tuple[float, float]], float | None]:
    """``(cost, quantized accuracy)`` of every finished ``stage`` among the runs, and the
    FP accuracy they were measured against (None when no run matched)."""
    if stage not in ("ptq", "qat"):
        raise HawqError(f"stage={stage!r} is invalid; allowed: ptq, qat")
    if cost not in ("bops", "size_mb", "int4_share"):
        raise HawqError(f"cost={cost!r} is invalid; allowed: bops, int4_share, size_mb")
    points, fp = [], None
    for pattern in run_globs:
        for run in sorted(glob.glob(pattern)):
            res_path, plan = Path(run) / RESULTS, Path(run) / f"{stage}_bits.yaml"
            if not res_path.is_file() or not plan.is_file():
                continue
            res = read_json(res_path)
            metrics = res.get("stages", {}).get(stage)
            if not metrics:
                continue
            costs = plan_costs(plan, res["config"]["paths"]["checkpoint"])
            points.append((costs[cost], metrics["quantized"]["acc"]))
            fp = metrics.get("fp", {}).get("acc", fp)
    return points, fp


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hawq.report", description=__doc__.split("\n")[0])
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
        pins[op] = _pin(bits)
    first = _pin(args.pin_first) if args.pin_first else None
    last = _pin(args.pin_last) if args.pin_last else None
    lo, hi = budget_range(args.hessian, cands, args.kind, pins, first, last)
    print(repr(budget_at(lo, hi, args.fraction)))  # all digits: B(0) stays feasible
    return 0


def _artifacts(args: argparse.Namespace) -> int:
    import os

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


if __name__ == "__main__":
    sys.exit(main())
