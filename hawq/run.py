"""Command-line entry: ``python -m hawq.run experiment=vit_cifar [key=value ...]``.

A thin Hydra wrapper over :func:`hawq.pipeline.run_pipeline`. Errors a user can
cause print one line (``hawq: error: ...``) and exit with status 2; set
``HAWQ_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hawq import sweep
from hawq.errors import HawqError, choices
from hawq.pipeline import run_pipeline

CONF_DIR = Path(__file__).resolve().parent / "conf"
log = logging.getLogger("hawq")


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=option`` overrides naming an option with no config file.

    Hydra would fail too, with a multi-line report; this gives one line naming
    the bad value and the allowed ones.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        group = conf_dir / key
        if "." in key or not group.is_dir():
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for v in value.split(","):  # multirun sweeps list options with commas
            if v not in options and v != "null":
                raise HawqError(f"unknown {key} {v!r}; available: {choices(options)}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    multirun = sweep.in_multirun()
    try:
        if multirun:
            sweep.use_job_dir(cfg)
        results = run_pipeline(cfg)
    except HawqError as e:
        if os.environ.get("HAWQ_DEBUG"):
            raise
        if multirun:  # this point fails alone; the sweep goes on
            sweep.report_failed_point(e)
            return None
        print(f"hawq: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    evaluation = results["stages"].get("evaluate")
    return evaluation["fp"]["acc"] if evaluation else None  # for Hydra sweepers


def main() -> None:
    argv = sys.argv[1:]
    failed: list[str] = []
    try:
        if sweep.is_multirun(argv):
            argv, failed = sweep.drop_unknown_options(argv, CONF_DIR)
            for line in failed:
                print(f"hawq: error: sweep point {line}", file=sys.stderr)
        else:
            check_group_choices(argv)
    except HawqError as e:
        print(f"hawq: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if not sweep.is_multirun(argv):
        _hydra_main()
        return
    sys.argv[1:] = argv
    log_path = sweep.start_failure_log()
    _hydra_main()
    failed += sweep.read_failure_log(log_path)
    if failed:
        names = "; ".join(line.split(": ", 1)[0] for line in failed)
        print(f"hawq: error: {len(failed)} sweep point(s) failed: {names}", file=sys.stderr)
        sys.exit(HawqError.exit_code)


if __name__ == "__main__":
    main()
