"""Command-line entry: ``python -m hawq.run experiment=vit_cifar [key=value ...]``.

A thin Hydra wrapper over :func:`hawq.pipeline.run_pipeline`. Errors a user can
cause print one line (``hawq: error: ...``) and exit with status 2; set
``HAWQ_DEBUG=1`` for the traceback. Before Hydra starts (and writes its log into the
run directory) the command line is composed once here, so an override Hydra rejects
(``train.foo=1`` without ``+``) and an unusable ``paths.run_dir`` (empty, under a
regular file, read-only) also end in one line with nothing written. Ctrl-C prints one
line and exits 130; the per-epoch state files stay, and the same command resumes.
SIGTERM and SIGUSR1 (preemption, Slurm's requeue) stop a training epoch after its current
step with a mid-epoch state, print one line and exit 143 / 138 (:mod:`hawq.preempt`).

``hydra.run.dir=DIR`` is honoured: it sets ``paths.run_dir=DIR`` (artifacts, Hydra's
log and ``.hydra/`` all go there); giving both with different values is an error.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hawq import preempt, sweep
from hawq.config import CONF_DIR
from hawq.errors import HawqError, choices
from hawq.pipeline import run_pipeline, validate

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


_RUN_DIR_KEYS = ("paths.run_dir", "+paths.run_dir", "++paths.run_dir")
_HYDRA_DIR_KEYS = ("hydra.run.dir", "+hydra.run.dir", "++hydra.run.dir")


def honour_hydra_run_dir(argv: list[str]) -> list[str]:
    """``hydra.run.dir=DIR`` -> also ``paths.run_dir=DIR``, so artifacts follow it."""
    given = {k: v for a in argv if "=" in a for k, v in [a.split("=", 1)]}
    hydra_dir = next((given[k] for k in _HYDRA_DIR_KEYS if k in given), None)
    if hydra_dir is None:
        return argv
    run_dir = next((given[k] for k in _RUN_DIR_KEYS if k in given), None)
    if run_dir is not None and run_dir != hydra_dir:
        raise HawqError(
            f"hydra.run.dir={hydra_dir} and paths.run_dir={run_dir} disagree; "
            "set only paths.run_dir (Hydra's log and .hydra/ follow it)"
        )
    return argv if run_dir is not None else [*argv, f"paths.run_dir={hydra_dir}"]


def explicit_default_wins(argv: list[str]) -> list[str]:
    """``quant.default.<key>=`` bits on the command line win over a ``bits.yaml`` in the run
    directory (which ``ptq``/``qat`` would otherwise take first and silently ignore them):
    ``quant.plan=default`` is added, unless ``quant.plan`` is given too (``resolve_plan``
    logs that the file was not used)."""
    given = [a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a]
    bits = [
        k for k in given if k in ("quant.default.w_bits", "quant.default.a_bits", "quant.default")
    ]
    if not bits or "quant.plan" in given:
        return argv
    return [*argv, "quant.plan=default"]


#: group -> where its ``custom`` option takes the user's own keywords
CUSTOM_KEYWORDS = {"model": "model.", "data": "data.datasets."}


def open_custom_groups(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """With ``model=custom`` / ``data=custom``, the user's own keywords (``model.width=64``,
    ``data.datasets.root=...``) are added to the group (``++``) instead of being refused
    as unknown keys of the option file."""
    chosen = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        for group, prefix in CUSTOM_KEYWORDS.items():
            if chosen.get(group) != "custom" or not key.startswith(prefix):
                continue
            known = OmegaConf.load(conf_dir / group / "custom.yaml")
            inner = key[len(group) + 1 :]
            if OmegaConf.select(known, inner, default=None, throw_on_missing=False) is None:
                a = f"++{a}"
        out.append(a)
    return out


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line composition error as one line (an unknown key names the ``+``)."""
    m = re.match(r"Could not override '([^']+)'\.\s*To append to your config use (\S+)", str(e))
    if m:
        key = m.group(1)
        group = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return (
            f"unknown config key {key}: not in {group}; allowed: the keys it has "
            f"(python -m hawq.run --cfg job), or {m.group(2)} to add a new one"
        )
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "Set the env"))]
    return "; ".join(lines) or type(e).__name__


def precheck(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Compose the config as Hydra will and check ``paths.run_dir``, before Hydra writes.

    Skipped for ``-m``/``--help``/``--cfg`` style flags (Hydra's own modes)."""
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as e:
        raise HawqError(_one_line(e)) from e
    try:
        OmegaConf.resolve(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except OmegaConfBaseException:
        return  # an interpolation only Hydra's app resolves (${hydra:...}): checked later
    validate(cfg)


def _fail(e: HawqError) -> None:
    if os.environ.get("HAWQ_DEBUG"):
        raise e
    message = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    print(f"hawq: error: {message}", file=sys.stderr)  # always one line
    sys.exit(e.exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    multirun = sweep.in_multirun()
    try:
        if multirun:
            sweep.use_job_dir(cfg)
        results = run_pipeline(cfg)
    except HawqError as e:
        if multirun and not os.environ.get("HAWQ_DEBUG"):  # this point fails alone
            sweep.report_failed_point(e)
            return None
        _fail(e)
    except KeyboardInterrupt:
        if os.environ.get("HAWQ_DEBUG"):
            raise
        print(
            f"hawq: interrupted (Ctrl-C); finished epochs are kept in {cfg.paths.run_dir}: "
            "the same command resumes",
            file=sys.stderr,
        )
        sys.exit(130)
    except preempt.Stopped as e:
        if os.environ.get("HAWQ_DEBUG"):
            raise
        kept = e.where or f"finished epochs and stages are kept in {cfg.paths.run_dir}"
        print(f"hawq: stopped by {e.name}; {kept}: the same command resumes", file=sys.stderr)
        sys.exit(e.exit_code)
    evaluation = results["stages"].get("evaluate")
    return evaluation["fp"]["acc"] if evaluation else None  # for Hydra sweepers


def main() -> None:
    preempt.install()  # SIGTERM / SIGUSR1: a resumable stop, exit 128 + signal
    argv = sys.argv[1:]
    failed: list[str] = []
    try:
        argv = honour_hydra_run_dir(argv)
        if sweep.is_multirun(argv):
            argv, failed = sweep.drop_unknown_options(argv, CONF_DIR)
            for line in failed:
                print(f"hawq: error: sweep point {line}", file=sys.stderr)
        else:
            check_group_choices(argv)
            argv = explicit_default_wins(open_custom_groups(argv))
            precheck(argv)
    except HawqError as e:
        _fail(e)
    except KeyboardInterrupt:
        sys.exit(130)
    except preempt.Stopped as e:
        sys.exit(e.exit_code)
    sys.argv[1:] = argv
    if not sweep.is_multirun(argv):
        _hydra_main()
        return
    log_path = sweep.start_failure_log()
    _hydra_main()
    failed += sweep.read_failure_log(log_path)
    if failed:
        names = "; ".join(line.split(": ", 1)[0] for line in failed)
        print(f"hawq: error: {len(failed)} sweep point(s) failed: {names}", file=sys.stderr)
        sys.exit(HawqError.exit_code)


if __name__ == "__main__":
    main()
