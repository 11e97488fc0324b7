"""Results tables, budgets and the notebooks' helpers, each in its module:

* :mod:`.tables`: Markdown results tables from ``rows.yaml`` and run directories;
* :mod:`.budgets`: budgets as fractions of their range (HAWQ-V3), plan costs, trade-offs;
* :mod:`.notebook`: the CLI's config and stages run from a notebook;
* :mod:`.cli`: ``python -m hawq.report table | budget | tradeoff | publish | verify``.
"""

from hawq.report.budgets import budget_at, budget_range, plan_costs, tradeoff_points
from hawq.report.cli import main
from hawq.report.notebook import compose_config, run_stages
from hawq.report.tables import Cell, Row, collect, load_rows, lookup, results_table

__all__ = [
    "Cell",
    "Row",
    "budget_at",
    "budget_range",
    "collect",
    "compose_config",
    "load_rows",
    "lookup",
    "main",
    "plan_costs",
    "results_table",
    "run_stages",
    "tradeoff_points",
]
