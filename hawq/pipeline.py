"""Run the configured stages in order, each from the files of the run directory.

A stage is a module ``hawq.stages.<name>`` with two functions:

* ``done(ctx) -> bool``: its outputs already exist (then it is skipped unless
  ``force=true``);
* ``run(ctx) -> dict``: do the work, write its artifacts, return metrics, which
  the pipeline records in ``results.json`` under ``stages.<name>``.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from types import ModuleType

from omegaconf import DictConfig

import hawq.stages
from hawq.config import DataConfig, RunConfig, TrainConfig, run_config, typed
from hawq.errors import HawqError, choices
from hawq.lock import RunDirLock
from hawq.stages.context import Context

log = logging.getLogger("hawq")


def available_stages() -> list[str]:
    """Names of the modules in :mod:`hawq.stages` that define ``run`` and ``done``."""
    names = []
    for info in pkgutil.iter_modules(hawq.stages.__path__):
        mod = importlib.import_module(f"hawq.stages.{info.name}")
        if callable(getattr(mod, "run", None)) and callable(getattr(mod, "done", None)):
            names.append(info.name)
    return names


def load_stage(name: str) -> ModuleType:
    known = available_stages()
    if name not in known:
        raise HawqError(f"unknown stage {name!r}; available: {choices(known)}")
    return importlib.import_module(f"hawq.stages.{name}")


def run_pipeline(cfg: DictConfig) -> dict:
    """Run ``cfg.stages`` in order; returns the final contents of ``results.json``."""
    run = run_config(cfg)
    stages = [load_stage(name) for name in run.stages]  # fail on a typo before any work
    typed(cfg.data, DataConfig, "data")
    typed(cfg.train, TrainConfig, "train")
    with RunDirLock(cfg.paths.run_dir):  # one process per run directory at a time
        return _run_stages(cfg, run, stages)


def _run_stages(cfg: DictConfig, run: RunConfig, stages: list[ModuleType]) -> dict:
    ctx = Context(cfg, run)
    log.info("run directory: %s (device %s)", ctx.run_dir, ctx.device)
    for name, stage in zip(run.stages, stages):
        if not run.force and stage.done(ctx):
            log.info("%s: outputs exist, skipped (force=true to redo)", name)
            continue
        start = time.perf_counter()
        metrics = stage.run(ctx)
        metrics["wall_s"] = round(time.perf_counter() - start, 3)
        ctx.save_results(name, metrics)
        log.info("%s: done in %.1f s", name, metrics["wall_s"])
    ctx.save_results()  # also when every stage was skipped: config + provenance of this run
    return ctx.results
