"""Plot of cumulative INT4 curves: PTQ accuracy vs INT4 share, one line per op order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hawq.viz.common import plt, save_figure

COLORS = {"hessian": "tab:blue", "measured": "tab:orange", "random": "tab:gray"}


def plot_int4_curve(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    fp_acc: float,
    thresholds: Sequence[float] = (2.0, 5.0, 10.0),
    path: str | Path | None = None,
    title: str = "accuracy vs INT4 share",
    xlabel: str = "INT4 share of MACs",
):
    """Accuracy against INT4 share for each order, with lines at ``fp_acc - t``.

    Args:
        curves: order name -> ``(shares, accuracies)`` (shares in 0..1).
        fp_acc: the FP accuracy (percent), drawn as a solid line.
        thresholds: losses ``t`` (points) drawn as dashed lines at ``fp_acc - t``.
        path: write a PNG there when given.
        title / xlabel: labels.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (shares, accs) in curves.items():
        ax.plot([100 * s for s in shares], accs, "o-", markersize=3,
                color=COLORS.get(name), label=f"{name} order")  # fmt: skip
    ax.axhline(fp_acc, color="black", linewidth=1, label=f"FP {fp_acc:.2f}")
    for i, t in enumerate(thresholds):
        ax.axhline(fp_acc - t, color="tab:red", linestyle="--", linewidth=0.8,
                   alpha=max(0.3, 1.0 - 0.25 * i), label=f"FP - {t:g}")  # fmt: skip
    ax.set_xlabel(f"{xlabel} (%)")
    ax.set_ylabel("PTQ accuracy (%)")
    ax.set_xlim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig
