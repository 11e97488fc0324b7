"""Plots of a bit allocation: bits per op beside sensitivity; sensitivity vs budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hawq.viz.common import plt, save_figure

UNITS = {
    "avg_bits": "bits",
    "size_mb": "MB",
    "bops": "GBOPs / image",
    "latency_us": "us / image",
    "int4_share": "share of MACs at <= 4 bits",
}


def plot_allocation(
    w_bits: Mapping[str, float | None],
    a_bits: Mapping[str, float | None],
    sens_low: Mapping[str, float],
    sens_chosen: Mapping[str, float],
    path: str | Path | None = None,
    title: str = "bit allocation",
):
    """Top: weight/activation bits per op (FP drawn as 32). Bottom: sensitivity per op
    at its lowest-bit candidate (bars) and at the chosen setting (dots), log scale."""
    names = list(w_bits)
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.3 * len(names) + 2), 6.0))
    wb = [32 if w_bits[n] is None else w_bits[n] for n in names]
    ab = [32 if a_bits[n] is None else a_bits[n] for n in names]
    ax1.bar(x - 0.2, wb, 0.4, label="weight bits", color="tab:blue")
    ax1.bar(x + 0.2, ab, 0.4, label="activation bits", color="tab:orange")
    ax1.set_ylabel("bits")
    ax1.set_yticks(sorted(set(wb) | set(ab)))
    ax1.set_ylim(0, max(wb + ab) * 1.08)
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    ax1.set_title(title)
    low = np.array([max(float(sens_low[n]), 1e-30) for n in names])
    ax2.bar(x, low, color="tab:gray", label="at lowest-bit candidate")
    ax2.plot(
        x,
        [max(float(sens_chosen[n]), 1e-30) for n in names],
        "o",
        color="tab:red",
        label="at chosen setting",
    )
    if (low > 0).any():
        ax2.set_yscale("log")
    ax2.set_ylabel("predicted sensitivity")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_xticks(x)
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    ax2.set_xlabel("op (network order)")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def budget_title(method: str, budgets: Mapping[str, float]) -> str:
    """``hawq_v3 under int4_share >= 0.5, bops <= 10 GBOPs / image`` (not a raw dict)."""
    if not budgets:
        return f"{method}: no budget"
    parts = []
    for kind, value in budgets.items():
        rel = ">=" if kind == "int4_share" else "<="  # int4_share is a lower bound
        unit = f" {UNITS.get(kind, '')}".rstrip()
        unit = f" ({unit.strip()})" if kind == "int4_share" else unit
        parts.append(f"{kind} {rel} {value:g}{unit}")
    return f"{method} under {', '.join(parts)}"


def plot_frontier(
    kind: str,
    costs: Sequence[float],
    objectives: Sequence[float],
    chosen: tuple[float, float] | None = None,
    path: str | Path | None = None,
    title: str = "predicted sensitivity vs budget",
):
    """The exact frontier ``min Omega`` against the total of budget ``kind``."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    # between sampled budgets the optimum is that of the next tighter point: an upper
    # budget keeps the point to its left, a lower bound (int4_share) the one to its right
    where = "pre" if kind == "int4_share" else "post"
    ax.step(costs, objectives, where=where, color="tab:blue", alpha=0.5)
    ax.plot(costs, objectives, "o", color="tab:blue", label="ILP optimum")
    if chosen is not None:
        ax.plot(*chosen, "*", color="tab:red", markersize=14, label="this allocation")
    if any(o > 0 for o in objectives):
        ax.set_yscale("log")
    ax.set_xlabel(f"{kind} ({UNITS.get(kind, '')})")
    ax.set_ylabel("total predicted sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_latency(table: Mapping, path: str | Path | None = None):
    """Per op (network order), microseconds per image at each setting of a latency table
    (:mod:`hawq.integer.latency`), log scale."""
    names = list(table["ops"])
    rows = [table["by_shape"][table["ops"][n]] for n in names]
    settings = list(dict.fromkeys(k for row in rows for k in row))
    x = np.arange(len(names))
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.0))
    for j, key in enumerate(settings):
        ys = [row.get(key, np.nan) for row in rows]
        ax.bar(x + (j - (len(settings) - 1) / 2) * width, ys, width, label=key)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel(f"{UNITS['latency_us']} (batch {table.get('batch', '?')})")
    ax.set_title(f"latency per op: {table.get('device', '')}, {table.get('backend', '')}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(len(settings), 4))
    if path is not None:
        save_figure(fig, path)
    return fig
