"""Plot of cumulative INT4 curves: PTQ accuracy vs INT4 share, one line per op order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hawq.viz.common import plt, save_figure

COLORS = {"hessian": "tab:blue", "measured": "tab:orange", "random": "tab:gray"}


def _accuracy_lines(ax, fp_acc: float, thresholds: Sequence[float]) -> None:
    """The FP accuracy and one dashed line per allowed drop below it."""
    ax.axhline(fp_acc, color="black", linewidth=1, label=f"FP {fp_acc:.2f}")
    for i, t in enumerate(thresholds):
        ax.axhline(
            fp_acc - t,
            color="tab:red",
            linestyle="--",
            linewidth=0.8,
            alpha=max(0.3, 1.0 - 0.25 * i),
            label=f"FP - {t:g}",
        )


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
        ax.plot(
            [100 * s for s in shares],
            accs,
            "o-",
            markersize=3,
            color=COLORS.get(name),
            label=f"{name} order",
        )
    _accuracy_lines(ax, fp_acc, thresholds)
    ax.set_xlabel(f"{xlabel} (%)")
    ax.set_ylabel("PTQ accuracy (%)")
    ax.set_xlim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_int4_share_curves(
    entries: Mapping[str, Mapping],
    random_band: Mapping | None,
    fp_acc: float,
    thresholds: Sequence[float] = (2.0, 5.0, 10.0),
    path: str | Path | None = None,
    title: str = "accuracy vs INT4 share",
):
    """Two panels, INT4 share of ops (the seed study's count) and of MACs: one line per
    order, the random orders as their mean with a +-1 std band.

    Args:
        entries: order name -> ``int4_curve.json`` order record (``op_shares``, ``shares``,
            ``accuracies``).
        random_band: the ``random_band`` record (``runs``, ``acc_mean``, ``acc_std``) or None.
        fp_acc / thresholds / path / title: as :func:`plot_int4_curve`.
    """
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in (
        (axes[0], "op_shares", "INT4 share of ops"),
        (axes[1], "shares", "INT4 share of MACs"),
    ):
        for name, e in entries.items():
            if name == "random" and random_band is not None:
                continue
            ax.plot(
                [100 * s for s in e[key]],
                e["accuracies"],
                "o-",
                markersize=3,
                color=COLORS.get(name),
                label=f"{name} order",
            )
        if random_band is not None:
            if key == "op_shares":  # every permutation has the same op shares
                x = np.array(random_band["op_shares"])
                mean, std = np.array(random_band["acc_mean"]), np.array(random_band["acc_std"])
            else:  # MAC shares differ per permutation: interpolate onto one grid
                x = np.linspace(0, 1, 101)
                ys = np.array(
                    [np.interp(x, r["shares"], r["accuracies"]) for r in random_band["runs"]]
                )
                mean, std = ys.mean(0), ys.std(0, ddof=1 if len(ys) > 1 else 0)
            ax.plot(
                100 * x,
                mean,
                "-",
                color=COLORS["random"],
                label=f"random orders (mean +- std, n={random_band['n']})",
            )
            ax.fill_between(100 * x, mean - std, mean + std, color=COLORS["random"], alpha=0.3)
        _accuracy_lines(ax, fp_acc, thresholds)
        ax.set_xlabel(f"{label} (%)")
        ax.set_xlim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PTQ accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig
