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

from hawq.errors import HawqError, choices
from hawq.pipeline import run_pipeline

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = run_pipeline(cfg)
    except HawqError as e:
        if os.environ.get("HAWQ_DEBUG"):
            raise
        print(f"hawq: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    evaluation = results["stages"].get("evaluate")
    return evaluation["fp"]["acc"] if evaluation else None  # for Hydra sweepers


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except HawqError as e:
        print(f"hawq: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    _hydra_main()


if __name__ == "__main__":
    main()
