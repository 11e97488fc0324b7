"""Plots (matplotlib, Agg backend): one module per subject, PNG out."""

from hawq.viz.common import bar_per_op, save_figure

__all__ = ["bar_per_op", "save_figure"]
