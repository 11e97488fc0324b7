"""Plots across runs: accuracy against a cost (BOPs, size) for several series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hawq.viz.common import plt, save_figure


def plot_tradeoff(
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    path: str | Path,
    ylabel: str = "top-1 accuracy (%)",
    title: str = "accuracy vs cost",
    reference: Mapping[str, float] | None = None,
) -> Path:
    """One line of ``(cost, accuracy)`` points per series, sorted by cost.

    Args:
        series: label -> points (e.g. ``{"hawq_v3 PTQ": [(bops, acc), ...]}``).
        xlabel / ylabel / title: labels.
        path: the PNG to write.
        reference: label -> accuracy drawn as a horizontal line (e.g. the FP model).
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    for i, (label, y) in enumerate((reference or {}).items()):
        ax.axhline(y, color=f"C{(i + 5) % 10}", ls="--", lw=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
