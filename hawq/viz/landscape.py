"""Plots of ``landscape.json``: 1D curves, 2D contours, the quantization path, per-op rise."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from hawq.viz.common import save_figure

COLORS = {"fp": "black", "w8": "tab:green", "w4": "tab:blue", "w3": "tab:purple",
          "w2": "tab:red", "ptq": "tab:orange"}  # fmt: skip


def _color(version: str, i: int) -> str:
    key = version.split("a")[0] if version.startswith("w") else version
    return COLORS.get(key, f"C{i % 10}")


def plot_1d(
    axis: Mapping, curves: Mapping[str, list[float]], points: Mapping[str, tuple[float, float]],
    title: str, path: str | Path,
) -> Path:  # fmt: skip
    """Loss along one direction for every model version.

    Args:
        axis: ``{"t": [...], "label": str}``.
        curves: version -> loss at every ``t`` (``fp``, ``w4``, ...).
        points: version -> ``(coordinate of Q(W)-W on this direction, L_FP(W + delta))``,
            drawn as markers on the FP curve's axes.
        title, path: labels and the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    t = np.asarray(axis["t"])
    for i, (name, loss) in enumerate(curves.items()):
        ax.plot(t, loss, label=name, color=_color(name, i), lw=1.6 if name == "fp" else 1.2)
    for i, (name, (c, loss)) in enumerate(points.items()):
        ax.plot([c], [loss], marker="*", ms=11, ls="none", color=_color(name, i),
                markeredgecolor="k", label=f"FP at Q_{name}(W): coord {c:.3g}")  # fmt: skip
    ax.set_xlabel(axis.get("label", "t"))
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_2d(
    surface: Mapping, grids: Mapping[str, list[list[float]]],
    points: Mapping[str, tuple[float, float]], title: str, path: str | Path,
    labels: tuple[str, str] = ("alpha", "beta"),
) -> Path:  # fmt: skip
    """Contours of the 2D surface, one panel per version, shared (log-spaced) levels.

    ``points``: version -> ``(alpha, beta)`` projection of its ``Q(W) - W``, marked
    on every panel.
    """
    a, b = np.asarray(surface["alpha"]), np.asarray(surface["beta"])
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    allv = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids.values()])
    allv = allv[np.isfinite(allv)]
    lo, hi = float(allv.min()), float(allv.max())
    levels = (np.geomspace(lo, hi, 20) if lo > 0 and hi > lo * 1.01 else
              np.linspace(lo, hi + 1e-12, 20))  # fmt: skip
    cs = None
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        cs = ax.contourf(a, b, np.asarray(grid, dtype=float), levels=levels, cmap="viridis")
        ax.contour(a, b, np.asarray(grid, dtype=float), levels=levels, colors="k",
                   linewidths=0.3)  # fmt: skip
        for i, (pname, (pa, pb)) in enumerate(points.items()):
            ax.plot([pa], [pb], marker="*", ms=10, color=_color(pname, i), markeredgecolor="w",
                    ls="none", label=f"Q_{pname}(W)")  # fmt: skip
        ax.plot([0], [0], marker="o", ms=4, color="w")
        ax.set_title(f"{name}")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        if points:
            ax.legend(fontsize=6, loc="upper right")
    if cs is not None:
        fig.colorbar(cs, ax=axes.ravel().tolist(), label="loss")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_quant_path(paths: Mapping[str, Mapping], title: str, path: str | Path) -> Path:
    """:math:`L(W + t\\delta)` (solid) vs :math:`L_0 + t g^\\top\\delta + \\tfrac12 t^2
    \\delta^\\top H\\delta` (dashed) for every version; ``t = 1`` is ``Q(W)``."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, (name, p) in enumerate(paths.items()):
        c = _color(name, i)
        ax.plot(p["t"], p["loss"], color=c, label=f"{name}: measured")
        if p.get("quadratic") is not None:
            ax.plot(p["t"], p["quadratic"], color=c, ls="--", label=f"{name}: 2nd order")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("t  (W + t (Q(W) - W);  t = 1 is the quantized weights)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_op_rise(
    per_op: Mapping[str, Mapping[str, Mapping[str, float]]], key: str, title: str,
    path: str | Path,
) -> Path:  # fmt: skip
    """Per op: loss rise from quantizing that op alone vs its curvature ``key``.

    Args:
        per_op: version -> op -> row of :func:`hawq.analysis.op_quant_rise` (with ``lambda``
            when known).
        key: x quantity: ``lambda`` (top eigenvalue) or ``curvature`` (along the offset).
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, ops) in enumerate(per_op.items()):
        rows = [(op, r[key], r["rise"]) for op, r in ops.items() if r.get(key) is not None]
        if not rows:
            continue
        xs = [abs(x) for _, x, _ in rows]
        ys = [y for _, _, y in rows]
        ax.scatter(xs, ys, color=_color(name, i), label=name, s=18)
        for op, x, y in rows:
            ax.annotate(op, (abs(x), y), fontsize=5, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel(f"|{key}| of the op's weight Hessian block")
    ax.set_ylabel("L(W + delta_op) - L(W)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
