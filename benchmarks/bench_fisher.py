"""Cost and ranking quality of the cheap curvature settings against the full Hessian (issue 32).

Usage::

    python benchmarks/bench_fisher.py --checkpoint RUN/model.pt --data ../shared/data/cifar10 \\
        [--out benchmarks/results/fisher_cpu_vit.json]

On one trained checkpoint (the CPU ViT by default config), in one process on this machine:
the ``hessian`` stage at the study's budget (``experiment=vit_cifar_cpu_hessian``: Hutchinson
weight + activation traces, <= 100 samples of batch 128), a cheaper Hessian setting (<= 30
samples), and ``hessian.method=fisher`` (empirical Fisher from per-sample gradients). For each
setting: wall seconds, and Spearman rank correlation with the full setting's per-op
sensitivities (weight trace / numel, operand traces / numel, and their sum as the allocator's
``hawq_v3_act`` reads it); and the ILP plan at INT4 share 0.5 / 0.75 from each (share of ops
given the same bits as the full setting's plan). The CPU is named in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

SETTINGS = {"hessian_full": (), "hessian_30": ("hessian.max_samples=30",),
            "fisher": ("hessian.method=fisher",)}  # fmt: skip


def run(run_dir: Path, ckpt: str, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=vit_cifar_cpu_hessian",
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


def plan(run_dir: Path, ckpt: str, share: float) -> dict[str, str]:
    """Op -> "W<w>A<a>" of the ILP plan at ``alloc.int4_share=share`` from this report."""
    import yaml

    res = run(run_dir, ckpt, "stages=[alloc]", f"alloc.int4_share={share}", "force=true")
    ops = yaml.safe_load(Path(res["stages"]["alloc"]["bits"]).read_text())["plan"]
    return {k: f"W{v.get('w_bits')}A{v.get('a_bits')}" for k, v in ops.items() if k != "_default"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=os.environ.get("HAWQ_DATA", "data/cifar10"))
    ap.add_argument("--out", default="benchmarks/results/fisher_cpu_vit.json")
    args = ap.parse_args()
    os.environ["HAWQ_DATA"] = str(Path(args.data).resolve())
    ckpt = str(Path(args.checkpoint).resolve())
    out: dict = {"cpu": isa.describe(), "machine": platform.machine(), "threads": os.cpu_count(),
                 "load_avg_1min": os.getloadavg()[0], "checkpoint": ckpt, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        reports = {}
        for name, extra in SETTINGS.items():
            run_dir = Path(tmp) / name
            res = run(run_dir, ckpt, *extra)
            reports[name] = json.loads((run_dir / "hessian.json").read_text())
            out["settings"][name] = {"wall_s": res["stages"]["hessian"]["wall_s"],
                                     "hvp_products": reports[name].get("hvp_products")}
            for share in (0.5, 0.75):
                out["settings"][name][f"plan_{share}"] = plan(run_dir, ckpt, share)
        full = sensitivities(reports["hessian_full"])
        for name in SETTINGS:
            s, row = sensitivities(reports[name]), out["settings"][name]
            for kind, ref in full.items():
                keys = sorted(set(ref) & set(s[kind]))
                rho = spearmanr([ref[k] for k in keys], [s[kind][k] for k in keys])[0]
                row[f"spearman_{kind}"] = float(rho)
            for share in (0.5, 0.75):
                a, b = out["settings"]["hessian_full"][f"plan_{share}"], row[f"plan_{share}"]
                row[f"same_bits_{share}"] = sum(a.get(k) == b.get(k) for k in a) / max(len(a), 1)
            row["wall_vs_full"] = row["wall_s"] / out["settings"]["hessian_full"]["wall_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: {m: v for m, v in r.items() if not m.startswith("plan")}
                      for k, r in out["settings"].items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
