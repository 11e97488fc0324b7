"""Multirun sweeps: each point its own run directory, a bad point fails alone and named.

``python -m hawq.run -m key=a,b ...`` expands into points (Hydra's sweeper). Hawq
adds three things:

* **run directories**: unless ``paths.run_dir`` or ``name`` is overridden, a
  point runs in Hydra's job directory ``${paths.runs}/multirun/${name}/<override
  dirname>`` (e.g. ``runs/multirun/smoke/train.epochs=2``), so points never share
  files and re-running the same point reuses its artifacts; two points mapped onto
  one directory (``name=fixed seed=0,1``) fail rather than share it;
* **unknown group options** (``model=vit_tiny,nope``) are dropped from the sweep
  before it starts, each reported as a failed point, instead of Hydra aborting
  the whole sweep when it reaches them;
* **failed points**: a point that raises :class:`~hawq.errors.HawqError` prints
  ``hawq: error: sweep point #i (overrides): ...`` and the sweep goes on; at the
  end the process exits 2 naming every failed point.

Failures travel from the jobs (possibly joblib worker processes) to the launching
process through an append-only file named by ``$HAWQ_SWEEP_FAILURES``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig

from hawq.errors import HawqError, choices

FAILURES_ENV = "HAWQ_SWEEP_FAILURES"
POINT_FILE = ".hawq_sweep_point"


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def group_options(conf_dir: Path, key: str) -> list[str] | None:
    """Options of config group ``key`` (its ``*.yaml`` stems), or None if not a group."""
    group = conf_dir / key
    if "." in key or key.startswith("hydra") or not group.is_dir():
        return None
    return sorted(p.stem for p in group.glob("*.yaml"))


def drop_unknown_options(argv: list[str], conf_dir: Path) -> tuple[list[str], list[str]]:
    """Remove unknown group options from sweep overrides.

    Returns:
        ``(argv, failed)``: the command line with only known options left in each
        group sweep, and one message per dropped option (``model=nope: ...``).

    Raises:
        HawqError: a group override has no known option at all (nothing to run).
    """
    parser = OverridesParser.create()
    kept, failed = [], []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            kept.append(arg)
            continue
        try:
            (ov,) = parser.parse_overrides([arg])
            options = group_options(conf_dir, ov.key_or_group) if ov.package is None else None
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else None
        except Exception:  # noqa: BLE001 - bad syntax or glob(): Hydra reports or expands it
            kept.append(arg)
            continue
        if options is None or values is None:
            kept.append(arg)
            continue
        key = ov.key_or_group
        good = [v for v in values if v in options or v == "null"]
        bad = [v for v in values if v not in good]
        if not good:
            raise HawqError(f"unknown {key} {bad[0]!r}; available: {choices(options)}")
        failed += [f"{key}={v}: unknown {key} {v!r}; available: {choices(options)}" for v in bad]
        kept.append(f"{arg.split('=', 1)[0]}={','.join(good)}" if bad else arg)
    return kept, failed


def start_failure_log() -> Path:
    """Create the file sweep jobs append failures to and export its path."""
    fd, name = tempfile.mkstemp(prefix="hawq-sweep-", suffix=".log")
    os.close(fd)
    os.environ[FAILURES_ENV] = name
    return Path(name)


def read_failure_log(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    finally:
        path.unlink(missing_ok=True)
    return [line for line in lines if line.strip()]


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def point_name() -> str:
    """``#<job number> (<overrides>)`` of the running sweep point."""
    job = HydraConfig.get().job
    return f"#{job.num} ({','.join(HydraConfig.get().overrides.task)})"


def use_job_dir(cfg: DictConfig) -> None:
    """Give this point its run directory and claim it.

    Hydra's job directory (``runs/multirun/<name>/<overrides>``) unless the
    command sets ``paths.run_dir`` or ``name`` (e.g. ``'name=x_${seed}'``, which
    names each point's folder ``runs/x_0``, ``runs/x_1``). The directory records
    the point that owns it (its override dirname, ``.hawq_sweep_point``); a
    different point mapped onto it fails instead of skipping on the other's files.

    Raises:
        HawqError: the directory belongs to another sweep point.
    """
    hc = HydraConfig.get()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}
    if not keys & {"paths.run_dir", "name"}:
        cfg.paths.run_dir = hc.runtime.output_dir
    run_dir = Path(cfg.paths.run_dir).expanduser()
    claim = run_dir / POINT_FILE
    point = hc.job.override_dirname or "(no overrides)"
    if claim.is_file() and (owner := claim.read_text().strip()) != point:
        raise HawqError(
            f"run directory {run_dir} already holds sweep point {owner!r}, not "
            f"{point!r}: make name depend on the swept keys (e.g. "
            "'name=x_${seed}') or drop the name/paths.run_dir override"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    claim.write_text(point + "\n")


def report_failed_point(err: HawqError) -> None:
    """Print the failed point's one line and record it for the end-of-sweep summary."""
    line = f"{point_name()}: {err}"
    print(f"hawq: error: sweep point {line}", file=sys.stderr)
    log = os.environ.get(FAILURES_ENV)
    if log:
        with open(log, "a") as f:  # one short write per line: appends do not interleave
            f.write(line.replace("\n", " ") + "\n")
