"""Shared plotting helpers: per-op bar charts and atomic PNG saving."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hawq.io import write_bytes  # noqa: E402


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def bar_per_op(
    values: Mapping[str, float],
    title: str,
    ylabel: str,
    path: str | Path | None = None,
    log: bool = True,
    errors: Mapping[str, float] | None = None,
) -> Figure:
    """Bar chart of one quantity per op, ops in the mapping's (network) order.

    Args:
        values: op name -> value.
        title / ylabel: labels.
        path: write a PNG there when given.
        log: log-scale y axis (non-positive values are drawn at the axis floor).
        errors: op name -> error bar half-width (e.g. a standard error).
    """
    names = list(values)
    ys = [float(values[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.0))
    yerr = [float(errors.get(n, 0.0)) for n in names] if errors else None
    ax.bar(range(len(names)), ys, yerr=yerr, color="tab:blue", capsize=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    if log and any(y > 0 for y in ys):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig
