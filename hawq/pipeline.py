"""Run the configured stages in order, each from the files of the run directory.

A stage is a module ``hawq.stages.<name>`` with ``run(ctx) -> dict`` (do the work, write
its artifacts, return metrics). It is skipped unless ``force=true`` when its completion
record says it finished with the current config and inputs and its outputs are intact
(:func:`hawq.stages.record.check`).

After ``run`` the pipeline writes the stage's completion record (hashes of what it
wrote, of its inputs and of the config keys it reads) last and atomically, then
records the metrics in ``results.json`` under ``stages.<name>`` (restored from the
record when a kill came in between).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import pkgutil
import time
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import hawq.stages
from hawq.config import RunConfig, run_config, validate_groups
from hawq.distributed import is_main
from hawq.errors import HawqError, choices
from hawq.io import track_writes
from hawq.lock import RunDirLock
from hawq.stages import record
from hawq.stages.context import Context, check_run_dir

log = logging.getLogger("hawq")


def available_stages() -> list[str]:
    """Names of the modules in :mod:`hawq.stages` that define ``run`` (the stages; ``record``
    and ``context`` are the seam's own modules)."""
    names = []
    for info in pkgutil.iter_modules(hawq.stages.__path__):
        mod = importlib.import_module(f"hawq.stages.{info.name}")
        if callable(getattr(mod, "run", None)):
            names.append(info.name)
    return names


def load_stage(name: str) -> ModuleType:
    known = available_stages()
    if name not in known:
        raise HawqError(f"unknown stage {name!r}; available: {choices(known)}")
    return importlib.import_module(f"hawq.stages.{name}")


#: configs validated in this process (the CLI checks before Hydra starts, the pipeline after)
_VALIDATED: dict[str, tuple[RunConfig, list[ModuleType], dict[str, Any]]] = {}


def _digest(cfg: DictConfig) -> str | None:
    try:
        keys = [k for k in cfg if k != "hydra"]
        text = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, keys), resolve=True)
    except OmegaConfBaseException:
        return None  # an interpolation only Hydra's app resolves: validate then
    return hashlib.sha256(text.encode()).hexdigest()


def validate(cfg: DictConfig) -> tuple[RunConfig, list[ModuleType], dict[str, Any]]:
    """Check the top-level keys, the stage names and every config group the stages read
    (before any work; the CLI runs this before Hydra writes its log). Returns the run's
    keys, its stage modules and the typed groups the stages get from ``ctx.group``. The
    same config is validated once per process."""
    key = _digest(cfg)
    if key is not None and key in _VALIDATED:
        check_run_dir(cfg.paths.run_dir)
        return _VALIDATED[key]
    run = run_config(cfg)
    stages = [load_stage(name) for name in run.stages]  # fail on a typo before any work
    groups = validate_groups(
        cfg, {k.split(".")[0] for n in run.stages for k in record.spec_keys(n)}
    )
    check_run_dir(cfg.paths.run_dir)  # before anything is written
    if key is not None:
        _VALIDATED[key] = (run, stages, groups)
    return run, stages, groups


def run_pipeline(cfg: DictConfig) -> dict:
    """Run ``cfg.stages`` in order; returns the final contents of ``results.json``."""
    run, stages, groups = validate(cfg)
    with RunDirLock(cfg.paths.run_dir):  # one process per run directory at a time
        return _run_stages(cfg, run, stages, groups)


def _run_stages(
    cfg: DictConfig, run: RunConfig, stages: list[ModuleType], groups: dict[str, Any]
) -> dict:
    ctx = Context(cfg, run, groups)
    log.info("run directory: %s (device %s)", ctx.run_dir, ctx.device)
    if not run.force:  # trained weights made with other settings: refuse before any work
        for name in run.stages:
            status = record.check(ctx, name, config_only=True)
            if status.changed and record.keeps_weights(name):
                record.refuse_or_redo(ctx, name, status)
    for name, stage in zip(run.stages, stages):
        if not run.force:
            status = record.check(ctx, name)
            if status.done or record.adopt(ctx, name):
                rec = record.load(ctx, name) or {}
                if ctx.stage_result(name) != rec.get("metrics"):  # killed before results.json
                    ctx.save_results(name, rec.get("metrics"))
                record.remove_finished_state(ctx, name)  # killed between record and cleanup
                log.info("%s: up to date, skipped (force=true to redo)", name)
                continue
            record.refuse_or_redo(ctx, name, status)
        before = record.begin(ctx, name)
        start = time.perf_counter()
        with track_writes() as written:
            metrics = stage.run(ctx)
        metrics["wall_s"] = round(time.perf_counter() - start, 3)
        if is_main():  # (state files deleted after the record are not its outputs)
            outputs = [p for p in written if not ctx.removed_after_record(p)]
            record.commit(ctx, name, before, outputs, metrics)
        ctx.save_results(name, metrics)
        ctx.record_written()
        log.info("%s: done in %.1f s", name, metrics["wall_s"])
    ctx.save_results()  # also when every stage was skipped: config + provenance of this run
    return ctx.results
