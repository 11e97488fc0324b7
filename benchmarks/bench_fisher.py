"""Cost and ranking quality of the cheap curvature settings against the full Hessian (issue 32).

Usage::

    python benchmarks/bench_fisher.py --checkpoint RUN/model.pt --data ../shared/data/cifar10 \\
        [--experiment torch_vit_cifar] [--out benchmarks/results/ranking_torch_vit.json]

On one trained checkpoint, in one process on this machine (the CPU named in the JSON), with
``--experiment`` giving the model and data (default: the CPU ViT's ``vit_cifar_cpu``):

* the ``hessian`` stage at the studies' budget (``hessian_full``: sandwich weight + Hutchinson
  activation traces, batch 128, <= 100 samples), ``hessian=fast`` (batch 64, <= 40 samples),
  the Hessian at 30 samples, and ``hessian.method=fisher`` (empirical Fisher from per-sample
  gradients): wall seconds, products, and Spearman rank correlation with the full setting's
  per-op sensitivities (weight trace / numel, operand traces / numel, and their sum);
* the ILP plan of each at 0.25 / 0.5 / 0.75 of the BOPs range (the studies' budgets) and its
  PTQ test accuracy (``stages=[alloc,ptq]``, the second study's quantizer settings);
* the seed's measured ranking (one INT4 PTQ evaluation per op on 5,000 held-out train images,
  ``int4_curve`` with ``curve.orders=[measured]``): its seconds, so that each setting's cost
  is also a fraction of the ranking it replaces (``wall_vs_measured``).

``--skip-measured`` / ``--skip-plans`` leave those parts out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hawq.config import CONF_DIR  # noqa: E402
from hawq.integer import isa  # noqa: E402
from hawq.pipeline import run_pipeline  # noqa: E402
from hawq.report.budgets import budget_at, budget_range  # noqa: E402

SETTINGS = {
    "hessian_full": ("hessian.batch_size=128", "hessian.max_samples=100", "hessian.top_k=0",
                     "hessian.density=false"),
    "hessian_fast": ("hessian=fast",),
    "hessian_30": ("hessian.batch_size=128", "hessian.max_samples=30", "hessian.top_k=0",
                   "hessian.density=false"),
    "fisher": ("hessian.method=fisher", "hessian.batch_size=128"),
}  # fmt: skip
FRACTIONS = (0.25, 0.5, 0.75)
#: the second study's PTQ settings for the plans (experiments/torch_vit_cifar/run_all.sh)
QUANT = ("quant.default.granularity=per_channel", "quant.default.calibrator=mse",
         "quant.default.a_symmetric=false")  # fmt: skip
#: the measured ranking alone: the seed's quantizer, 5,000 held-out train images, no curve
MEASURED = ("stages=[int4_curve]", "curve.orders=[measured]", "curve.step=1000",
            "data.val_size=5000", "curve.order_split=val",
            "curve.batch_size=100", "curve.rest=fp", "quant.default.w_bits=4",
            "quant.default.a_bits=4", "quant.default.granularity=per_tensor",
            "quant.default.symmetric=false", "quant.default.a_symmetric=false",
            "quant.default.calibrator=minmax", "quant.default.dynamic=true")  # fmt: skip


def run(run_dir: Path, ckpt: str, experiment: str, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "data.download=false",
                                           f"paths.run_dir={run_dir}", f"paths.checkpoint={ckpt}",
                                           *extra])  # fmt: skip
    t = time.perf_counter()
    res = run_pipeline(cfg)
    res["bench_wall_s"] = time.perf_counter() - t
    return res


def sensitivities(report: dict) -> dict[str, dict[str, float]]:
    """Per-op weight, activation and combined sensitivities (trace / numel)."""
    w, a = {}, {}
    for name, e in report["ops"].items():
        if e.get("trace") is not None and e.get("trace_numel"):
            w[name] = e["trace"] / e["trace_numel"]
        acts = e.get("act_trace") or {}
        a[name] = sum(v / max(e["act_numel"][k], 1) for k, v in acts.items() if v is not None)
    both = {n: w.get(n, 0.0) + a.get(n, 0.0) for n in a}
    return {"weight": w, "activation": a, "combined": both}


def plans(run_dir: Path, ckpt: str, experiment: str, budgets: dict[float, float]) -> dict:
    """The ILP plan from ``run_dir/hessian.json`` at each BOPs budget: its PTQ accuracy and
    op -> "W<w>A<a>"."""
    import yaml

    out = {}
    for f, bops in budgets.items():
        res = run(run_dir / f"plan_{f}", ckpt, experiment, "stages=[alloc,ptq]", *QUANT,
                  "alloc.int4_share=null", f"alloc.bops={bops}",
                  f"alloc.hessian={run_dir / 'hessian.json'}")  # fmt: skip
        ops = yaml.safe_load(Path(res["stages"]["alloc"]["bits"]).read_text())["plan"]
        out[str(f)] = {"bops": bops, "ptq_acc": res["stages"]["ptq"]["quantized"]["acc"],
                       "bits": {k: f"W{v.get('w_bits')}A{v.get('a_bits')}"
                                for k, v in ops.items() if k != "_default"}}  # fmt: skip
    return out


def compare(out: dict, reports: dict) -> None:
    """Spearman with the full setting, same-bits shares of the plans, cost ratios."""
    full = sensitivities(reports["hessian_full"])
    ref = out["settings"]["hessian_full"]
    measured = out.get("measured_ranking", {}).get("seconds")
    for name, row in out["settings"].items():
        s = sensitivities(reports[name])
        for kind, want in full.items():
            keys = sorted(set(want) & set(s[kind]))
            rho = spearmanr([want[k] for k in keys], [s[kind][k] for k in keys])[0]
            row[f"spearman_{kind}"] = float(rho)
        for f, p in row.get("plans", {}).items():
            a, b = ref["plans"][f]["bits"], p["bits"]
            p["same_bits_as_full"] = sum(a.get(k) == b.get(k) for k in a) / max(len(a), 1)
        row["wall_vs_full"] = row["wall_s"] / ref["wall_s"]
        if measured:
            row["wall_vs_measured"] = row["wall_s"] / measured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=os.environ.get("HAWQ_DATA", "data/cifar10"))
    ap.add_argument("--experiment", default="vit_cifar_cpu")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--skip-plans", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/ranking_cpu_vit.json")
    args = ap.parse_args()
    os.environ["HAWQ_DATA"] = str(Path(args.data).resolve())
    ckpt = str(Path(args.checkpoint).resolve())
    names = ["hessian_full", *(n for n in args.settings.split(",") if n != "hessian_full")]
    out: dict = {"cpu": isa.describe(), "machine": isa.model_name(), "threads": os.cpu_count(),
                 "load_avg_1min": os.getloadavg()[0], "checkpoint": ckpt,
                 "experiment": args.experiment, "settings": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_measured:
            res = run(Path(tmp) / "measured", ckpt, args.experiment, *MEASURED)
            out["measured_ranking"] = res["stages"]["int4_curve"]["ranking"]["measured"]
        reports, budgets = {}, {}
        for name in names:
            run_dir = Path(tmp) / name
            res = run(run_dir, ckpt, args.experiment, "stages=[hessian]", *SETTINGS[name])
            reports[name] = json.loads((run_dir / "hessian.json").read_text())
            out["settings"][name] = {"overrides": list(SETTINGS[name]),
                                     "wall_s": res["stages"]["hessian"]["wall_s"],
                                     "hvp_products": reports[name].get("hvp_products")}  # fmt: skip
            if not budgets:  # the studies' budgets: fractions of the BOPs range of W4/8 x A4/8
                cands = [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]
                lo, hi = budget_range(run_dir / "hessian.json", cands, "bops")
                budgets = {f: budget_at(lo, hi, f) for f in FRACTIONS}
            if not args.skip_plans:
                out["settings"][name]["plans"] = plans(run_dir, ckpt, args.experiment, budgets)
            print(name, out["settings"][name]["wall_s"], flush=True)
        compare(out, reports)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    brief = {k: {m: (v if m != "plans" else {f: p["ptq_acc"] for f, p in v.items()})
                 for m, v in r.items() if m != "overrides"}
             for k, r in out["settings"].items()}  # fmt: skip
    print(
        json.dumps({"measured_ranking": out.get("measured_ranking"), "settings": brief}, indent=1)
    )


if __name__ == "__main__":
    main()
