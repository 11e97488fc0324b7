"""Shared plotting helpers: per-op bar charts and atomic PNG saving."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

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
    xlabel: str = "op (network order)",
) -> Figure:
    """Bar chart of one quantity per op, ops in the mapping's (network) order.

    On a log axis every bar stays visible: with only positive values the axis is
    ``log``; when some are zero or negative (a noisy Hutchinson estimate of a
    near-zero trace) it is ``symlog`` with the linear band
    ``linthresh = min |v| over v != 0``, and negative bars are drawn in red with
    their own legend entry (indefinite curvature or noise) instead of vanishing
    below the axis.

    Args:
        values: op name -> value.
        title / ylabel / xlabel: labels.
        path: write a PNG there when given.
        log: log-scale y axis.
        errors: op name -> error bar half-width (e.g. a standard error).
    """
    names = list(values)
    ys = np.array([float(values[n]) for n in names])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.0))
    yerr = np.array([float(errors.get(n, 0.0) or 0.0) for n in names]) if errors else None
    neg = ys < 0
    colors = np.where(neg, "tab:red", "tab:blue")
    x = np.arange(len(names))
    ax.bar(x, ys, yerr=yerr, color=colors, capsize=2)
    if neg.any():
        handles = [Patch(color="tab:blue", label=">= 0"), Patch(color="tab:red", label="< 0")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    nonzero = np.abs(ys[ys != 0])
    if log and len(nonzero):
        if (ys > 0).all():
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=float(nonzero.min()))
            ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig
