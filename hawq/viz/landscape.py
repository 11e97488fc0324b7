"""Plots of ``landscape.json``: 1D curves, 2D contours, the quantization path, per-op rise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from hawq.viz.common import save_figure

COLORS = {
    "fp": "black",
    "w8": "tab:green",
    "w4": "tab:blue",
    "w3": "tab:purple",
    "w2": "tab:red",
    "ptq": "tab:orange",
}


def _color(version: str, i: int) -> str:
    key = version.split("a")[0] if version.startswith("w") else version
    return COLORS.get(key, f"C{i % 10}")


def plot_1d(
    axis: Mapping,
    curves: Mapping[str, list[float]],
    points: Mapping[str, tuple[float, float]],
    title: str,
    path: str | Path,
) -> Path:
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
        ax.plot(
            [c],
            [loss],
            marker="*",
            ms=11,
            ls="none",
            color=_color(name, i),
            markeredgecolor="k",
            label=f"FP at Q_{name}(W): coord {c:.3g}",
        )
    ax.set_xlabel(axis.get("label", "t"))
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


MARKERS = ("o", "D", "s", "^", "v", "p", "h", "8")  # one shape per version


def plot_2d(
    surface: Mapping,
    grids: Mapping[str, list[list[float]]],
    points: Mapping[str, tuple[float, float]],
    title: str,
    path: str | Path,
    labels: tuple[str, str] = ("alpha", "beta"),
) -> Path:
    """Contours of the 2D surface, one panel per version, shared (log-spaced) levels.

    ``points``: version -> ``(alpha, beta)`` projection of its ``Q(W) - W``, marked
    on every panel above the FP weights (the origin, a hollow circle), each
    version a hollow shape of its own size, so coinciding points nest visibly; one
    legend for the figure, with the coordinates.
    """
    a, b = np.asarray(surface["alpha"]), np.asarray(surface["beta"])
    n = len(grids)
    fig, axes = plt.subplots(
        1, n, figsize=(3.6 * n + 1.2, 4.4), squeeze=False, sharey=True, layout="constrained"
    )
    allv = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids.values()])
    allv = allv[np.isfinite(allv)]
    lo, hi = float(allv.min()), float(allv.max())
    levels = (
        np.geomspace(lo, hi, 20) if lo > 0 and hi > lo * 1.01 else np.linspace(lo, hi + 1e-12, 20)
    )
    cs = None
    for j, (ax, (name, grid)) in enumerate(zip(axes.flat, grids.items())):
        cs = ax.contourf(a, b, np.asarray(grid, dtype=float), levels=levels, cmap="viridis")
        ax.contour(a, b, np.asarray(grid, dtype=float), levels=levels, colors="k", linewidths=0.3)
        ax.plot(
            [0],
            [0],
            marker="o",
            ms=4.5,
            color="w",
            mec="k",
            mew=0.6,
            ls="none",
            zorder=20,
            label="FP weights W (origin)",
        )
        for i, (pname, (pa, pb)) in enumerate(points.items()):
            # hollow, shrinking shapes: points that (nearly) coincide show as nested rings
            ax.plot(
                [pa],
                [pb],
                marker=MARKERS[i % len(MARKERS)],
                ms=(24, 16, 9)[i % 3],
                mfc="none",
                mec=_color(pname, i),
                mew=2.0,
                ls="none",
                zorder=4 + i,
                path_effects=[patheffects.withStroke(linewidth=3.0, foreground="w")],
                label=f"Q_{pname}(W) at ({pa:.2g}, {pb:.2g})",
            )
        ax.set_title(name)
        ax.set_xlabel(labels[0])
        if j == 0:
            ax.set_ylabel(labels[1])
    if cs is not None:
        fig.colorbar(cs, ax=axes.ravel().tolist(), label="loss", format="%.3g")
    handles, names = axes.flat[0].get_legend_handles_labels()
    legend = fig.legend(
        handles,
        names,
        loc="outside lower center",
        ncol=min(len(names), 4),
        fontsize=8,
        facecolor="0.85",
    )
    for h in getattr(legend, "legend_handles", getattr(legend, "legendHandles", [])):
        h.set_markersize(min(h.get_markersize(), 9.0))  # the nesting sizes are for the panels
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


def spread_labels(xs: Sequence[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Positions for labels wanted at ``xs`` (in ``[lo, hi]``), at least ``gap`` apart.

    A forward pass pushes each label (in sorted order) right of its left
    neighbour, a backward pass pulls the run back left of ``hi``; both keep the
    order and, when ``(n - 1) gap <= hi - lo``, the gap and the bounds.
    Returns positions in the input order.
    """
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    pos = [0.0] * len(xs)
    prev = -np.inf
    for i in order:
        pos[i] = prev = max(xs[i], lo, prev + gap)
    nxt = hi + gap
    for i in reversed(order):
        pos[i] = nxt = min(pos[i], nxt - gap)
    return pos


def plot_op_rise(
    per_op: Mapping[str, Mapping[str, Mapping[str, float]]],
    key: str,
    title: str,
    path: str | Path,
) -> Path:
    """Per op: loss rise from quantizing that op alone vs its curvature ``key``.

    Every version's points of one op share its x (the op's curvature) and are
    joined by a thin line; each op is named once, above the axes, with labels
    spread apart and a leader line to the op's x, so names never overlap.

    Args:
        per_op: version -> op -> row of :func:`hawq.analysis.op_quant_rise` (with ``lambda``
            when known).
        key: x quantity: ``lambda`` (top eigenvalue) or ``curvature`` (along the offset).
    """
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    at: dict[str, float] = {}
    rises: dict[str, list[float]] = {}
    for i, (name, ops) in enumerate(per_op.items()):
        rows = [(op, abs(r[key]), r["rise"]) for op, r in ops.items() if r.get(key) is not None]
        if not rows:
            continue
        ax.scatter(
            [x for _, x, _ in rows],
            [y for _, _, y in rows],
            color=_color(name, i),
            label=name,
            s=20,
            zorder=3,
        )
        for op, x, y in rows:
            at.setdefault(op, x)
            rises.setdefault(op, []).append(y)
    for op, x in at.items():
        ax.plot([x, x], [min(rises[op]), max(rises[op])], color="0.6", lw=0.6, zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("symlog", linthresh=1e-4)
    if at:
        lo, hi = min(at.values()), max(at.values())
        ax.set_xlim(lo / 1.3, hi * 1.3)
        span = np.log(hi * 1.3) - np.log(lo / 1.3)
        names = list(at)
        frac = [(np.log(at[n]) - np.log(lo / 1.3)) / span for n in names]
        gap = 9.0 / (72.0 * fig.get_figwidth() * ax.get_position().width)  # ~9 pt per label
        for n, f, p in zip(names, frac, spread_labels(frac, gap, hi=1.0)):
            ax.annotate(
                n,
                xy=(f, 1.0),
                xycoords="axes fraction",
                xytext=(p, 1.06),
                textcoords="axes fraction",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=6.5,
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"},
            )
    ax.set_xlabel(f"|{key}| of the op's weight Hessian block")
    ax.set_ylabel("L(W + delta_op) - L(W)")
    ax.set_title(title, pad=95)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7, title="version", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    return save_figure(fig, path)
