"""Spearman rank correlation of the empirical-Fisher ranking with the Hessian ranking of the
second study (per-op weight, activation and combined sensitivities, as
``benchmarks/bench_fisher.py``), and both stages' wall times. Writes ``rankings.json``.

Usage: ``python experiments/torch_vit_cifar/rankings.py [--runs runs]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fisher import sensitivities  # noqa: E402
from hawq.integer import isa  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs")
    args = ap.parse_args()
    runs = Path(args.runs)
    reports, wall = {}, {}
    for name in ("hessian", "fisher"):
        run = runs / f"torch_vit_cifar_{name}"
        reports[name] = json.loads((run / "hessian.json").read_text())
        wall[name] = json.loads((run / "results.json").read_text())["stages"]["hessian"]["wall_s"]
    h, f = sensitivities(reports["hessian"]), sensitivities(reports["fisher"])
    out = {"machine": isa.model_name(), "wall_s": wall, "fisher_vs_hessian_time":
           wall["fisher"] / wall["hessian"], "spearman": {}}  # fmt: skip
    for kind in ("weight", "activation", "combined"):
        keys = sorted(set(h[kind]) & set(f[kind]))
        out["spearman"][kind] = float(spearmanr([h[kind][k] for k in keys],
                                                [f[kind][k] for k in keys])[0])  # fmt: skip
        out["spearman"][f"{kind}_ops"] = len(keys)
    path = Path(__file__).with_name("rankings.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
