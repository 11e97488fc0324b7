"""Plots of ``hessian.json``: per-op bar charts and SLQ spectral densities."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from hawq.hessian.density import SpectralDensity
from hawq.viz.common import bar_per_op, save_figure


def plot_report(report: Mapping, out_dir: str | Path, prefix: str = "hessian") -> list[Path]:
    """One log-scale bar chart per quantity, ops in network order.

    Writes ``<prefix>_trace.png`` (with standard-error bars),
    ``<prefix>_trace_per_param.png`` (trace / numel, HAWQ-v2's average curvature),
    ``<prefix>_eigenvalue.png`` (top eigenvalue) and ``<prefix>_act_trace.png``
    (one bar per op operand, ``op:operand``) when the report holds them.
    """
    out = Path(out_dir)
    ops = report["ops"]
    paths = []
    tr = {n: e["trace"] for n, e in ops.items() if e["trace"] is not None}
    if tr:
        err = {n: ops[n]["trace_stderr"] or 0.0 for n in tr}
        paths.append(out / f"{prefix}_trace.png")
        bar_per_op(
            tr, "Hessian trace per op (Hutchinson, +-1 stderr)", "trace", paths[-1], errors=err
        )
        per = {n: tr[n] / ops[n]["numel"] for n in tr if ops[n]["numel"]}
        paths.append(out / f"{prefix}_trace_per_param.png")
        bar_per_op(per, "Hessian trace / parameters per op", "trace / numel", paths[-1])
    eig = {n: e["eigenvalues"][0] for n, e in ops.items() if e["eigenvalues"]}
    if eig:
        paths.append(out / f"{prefix}_eigenvalue.png")
        bar_per_op(eig, "Top Hessian eigenvalue per op", "eigenvalue", paths[-1])
    act = {
        f"{n}:{k}": v
        for n, e in ops.items()
        for k, v in (e["act_trace"] or {}).items()
        if v is not None
    }
    if act:
        err = {
            f"{n}:{k}": v or 0.0
            for n, e in ops.items()
            for k, v in (e["act_trace_stderr"] or {}).items()
        }
        paths.append(out / f"{prefix}_act_trace.png")
        bar_per_op(act, "Activation Hessian trace per sample", "trace", paths[-1], errors=err)
    return paths


def plot_density(
    densities: Mapping[str, SpectralDensity], path: str | Path, points: int = 400
) -> Path:
    """SLQ densities on a log-density axis, one curve per entry (``""`` = whole model)."""
    n = len(densities)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, d) in zip(axes.flat, densities.items()):
        lo, hi = float(d.nodes.min()), float(d.nodes.max())
        pad = 0.05 * max(hi - lo, 1e-12)
        grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
        ax.semilogy(grid.numpy(), d.evaluate(grid).clamp_min(1e-12).numpy())
        ax.set_title(name or "all op weights", fontsize=8)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
