"""Block reconstruction at a glance: each unit's error before and after (ptq stage)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hawq.viz.common import plt, save_figure


def plot_reconstruction(
    units: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "block reconstruction"
) -> Path:
    """Grouped bars, units in network order: the unit's output error against the FP model
    at nearest rounding / calibrated steps (before) and after reconstruction; a unit that
    did not improve (restored) is hatched."""
    names = list(units)
    before = np.array([float(units[n]["before"]) for n in names])
    after = np.array([float(units[n]["after"]) for n in names])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.6))
    ax.bar(x - 0.2, before, 0.4, label="calibrated (nearest rounding)", color="#bbbbbb")
    bars = ax.bar(x + 0.2, after, 0.4, label="reconstructed", color="#1f77b4")
    for bar, n in zip(bars, names, strict=True):
        if not units[n].get("kept", True):
            bar.set_hatch("//")
    if (before > 0).all() and (after > 0).all():
        ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("output error vs FP (squared, per position)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
