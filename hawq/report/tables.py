"""Results tables built from run directories (``python -m hawq.report table``).

A table is described by *rows* (a YAML list, e.g. ``experiments/vit_cifar/rows.yaml``)::

    - label: FP
      runs: [vit_cifar, vit_cifar_s*]  # run directories under the runs root (globs), one per seed
      metric: stages.evaluate.fp.acc   # dotted path into each run's results.json
      command: python -m hawq.run experiment=vit_cifar seed=0,1,2 -m

:func:`results_table` reads every matching ``results.json`` and writes one Markdown row per
entry: the mean (and, for >= 2 runs, the sample standard deviation) of the metric, the
number of runs, the command, the commits and the hardware from the runs' provenance. A row
with no finished run reads ``to run``, so numbers are never typed by hand.
"""

from __future__ import annotations

import glob
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawq.errors import HawqError
from hawq.io import read_json, read_yaml

RESULTS = "results.json"


@dataclass
class Row:
    """One table row: a metric over the runs whose directories match ``runs``."""

    label: str
    runs: str | list[str]  # glob(s) of run directories under the runs root
    metric: str
    command: str = ""
    scale: float = 1.0  # e.g. 100 for a share stored as a fraction
    digits: int = 2
    note: str = ""
    artifact: str = ""  # published folder (results.json + checkpoint): hawq.artifacts
    extra: dict[str, Any] = field(default_factory=dict)


def lookup(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"][0]`` for ``"a.b.0"``; None when any step is missing."""
    for key in dotted.split("."):
        if isinstance(obj, Mapping) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.lstrip("-").isdigit() and abs(int(key)) < len(obj):
            obj = obj[int(key)]
        else:
            return None
    return obj


def load_rows(path: str | Path) -> list[Row]:
    """Rows from a YAML list of mappings (keys of :class:`Row`)."""
    data = read_yaml(path)
    if not isinstance(data, list):
        raise HawqError(f"{path}: expected a list of rows")
    rows = []
    for i, entry in enumerate(data):
        try:
            rows.append(Row(**entry))
        except TypeError as e:
            raise HawqError(f"{path}: row {i}: {e}") from e
    return rows


@dataclass
class Cell:
    """The aggregated value of one row."""

    values: list[float]
    commits: list[str]
    hardware: list[str]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


def collect(row: Row, runs_root: str | Path) -> Cell:
    """The metric of every finished run matching ``row.runs`` (sorted by directory)."""
    values, commits, hardware = [], [], []
    pats = [row.runs] if isinstance(row.runs, str) else list(row.runs)
    dirs = sorted({d for pat in pats for d in glob.glob(str(Path(runs_root) / pat))})
    for d in dirs:
        path = Path(d) / RESULTS
        if not path.is_file():
            continue
        res = read_json(path)
        v = lookup(res, row.metric)
        if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        values.append(float(v) * row.scale)
        prov = res.get("provenance", {})
        git = str(prov.get("git") or "?")
        commits.append(git[:7] + ("+dirty" if git.endswith("+dirty") else ""))
        hardware.append(str(prov.get("hardware") or "?"))
    return Cell(values, commits, hardware)


def _fmt(cell: Cell, digits: int) -> str:
    if not cell.values:
        return "to run"
    s = f"{cell.mean:.{digits}f}"
    if cell.std is not None and not math.isnan(cell.std):
        s += f" ± {cell.std:.{digits}f}"
    return s


def _uniq(xs: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(xs)) or "-"


def results_table(rows: Sequence[Row], runs_root: str | Path) -> str:
    """A Markdown table: label, value (mean ± std over runs), runs, command, commit, hardware."""
    lines = [
        "| row | value | runs | command | commit | hardware |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cell = collect(row, runs_root)
        label = row.label + (f" ({row.note})" if row.note else "")
        cmd = f"`{row.command}`" if row.command else "-"
        lines.append(
            f"| {label} | {_fmt(cell, row.digits)} | {len(cell.values)} | {cmd} | "
            f"{_uniq(cell.commits)} | {_uniq(cell.hardware)} |"
        )
    return "\n".join(lines) + "\n"
