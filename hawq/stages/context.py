"""What every stage gets: the config, the run directory, the device, data and models."""

from __future__ import annotations

import logging
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hawq.checkpoint import build_model, load_model
from hawq.config import RunConfig, validate_group
from hawq.data.module import ImageData
from hawq.data.user import UserData
from hawq.distributed import is_main
from hawq.engine import resolve_device
from hawq.errors import HawqError
from hawq.io import load_torch, read_json, write_error, write_json
from hawq.provenance import provenance

log = logging.getLogger("hawq")


def check_run_dir(value: object) -> Path:
    """``paths.run_dir`` must name a folder this process can write, or a path that can be
    created as one; checked before anything is written (Hydra's log included).

    Raises:
        HawqError: empty (an unset shell variable), a regular file on the path, or not
            writable (read-only file system, no permission).
    """
    if value is None or not str(value).strip():
        raise HawqError(
            "paths.run_dir is empty (an unset shell variable?); allowed: a folder "
            "path, e.g. paths.run_dir=runs/mine, or leave it and set name=<run name>"
        )
    run_dir = Path(str(value)).expanduser().resolve()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise HawqError(
            f"paths.run_dir={value}: {existing} is a regular file, not a folder; "
            "allowed: a folder path (or one that can be created)"
        )
    try:  # a real probe: access(2) says yes to root on a read-only mount's chmod 555 folder
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".hawq-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = write_error(existing, e)
        raise HawqError(f"paths.run_dir={value}: {err}") from e
    return run_dir


class Context:
    """Shared state of one pipeline run.

    Attributes:
        cfg: the full resolved Hydra config.
        run: validated top-level keys (name, seed, device, stages, force).
        run_dir: where every artifact of this run is read and written.
        device: the torch device stages compute on.
        results: the contents of ``results.json`` (updated by each stage).
    """

    RESULTS = "results.json"

    def __init__(self, cfg: DictConfig, run: RunConfig, groups: dict | None = None) -> None:
        self.cfg = cfg
        self.run = run
        self._groups = dict(groups or {})  # typed config groups, validated once
        self.run_dir = Path(cfg.paths.run_dir).expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(run.device)
        path = self.run_dir / self.RESULTS
        self.results: dict[str, Any] = read_json(path) if path.is_file() else {}
        self.results.setdefault("stages", {})
        # the code and machine this run started on: a later edit of the tree (while a long run
        # goes on) must not be recorded as what computed its results
        self.provenance = provenance(self.device)
        self._after_record: list[Path] = []

    def remove_after_record(self, path: Path) -> None:
        """Delete ``path`` (a resumable state file) once the running stage's completion
        record is written, not before: killed at any instant up to the record, the rerun
        still finds the state, resumes at its end and rebuilds the stage's metrics."""
        self._after_record.append(path)

    def removed_after_record(self, path: Path) -> bool:
        """Whether ``path`` is a file :meth:`remove_after_record` will delete."""
        return Path(path).resolve() in {p.resolve() for p in self._after_record}

    def record_written(self) -> None:
        """Called by the pipeline after a stage's record: delete what it asked to."""
        for p in self._after_record:
            p.unlink(missing_ok=True)
        self._after_record.clear()

    @property
    def force(self) -> bool:
        return self.run.force

    def path(self, name: str) -> Path:
        """An artifact of this run: ``run_dir / name``."""
        return self.run_dir / name

    @property
    def checkpoint(self) -> Path:
        """The FP model checkpoint (``paths.checkpoint``), trained here or given."""
        return Path(self.cfg.paths.checkpoint).expanduser().resolve()

    def group(self, name: str) -> Any:
        """Config group ``name`` as its typed dataclass (``ctx.group("quant")`` is a
        :class:`~hawq.quant.config.QuantConfig`): validated once per run, by the pipeline
        before any stage (a group no stage declared is validated on first use)."""
        if name not in self._groups:
            self._groups[name] = validate_group(self.cfg, name)
        return self._groups[name]

    @cached_property
    def data(self) -> ImageData | UserData:
        self.group("data")
        return instantiate(self.cfg.data)

    def loss_fn(self, label_smoothing: float = 0.0):
        """The training / curvature loss: the data's loss hook (``data.loss``) when it has
        one, else cross-entropy with ``label_smoothing``."""
        hook = getattr(self.data, "loss", None)
        return hook if hook is not None else nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def build_model(self) -> nn.Module:
        """A fresh model from ``cfg.model``, on the run's device."""
        torch.manual_seed(self.run.seed)
        return build_model(self.cfg.model).to(self.device)

    def load_fp_model(self) -> nn.Module:
        """The FP model from :attr:`checkpoint`, in eval mode on the run's device."""
        model, _ = load_model(self.checkpoint, self.device)
        return model.eval()

    def fp_model_config(self) -> dict | None:
        """The model config stored in the FP checkpoint (what rebuilds it), or None."""
        if not self.checkpoint.is_file():
            return None
        return load_torch(self.checkpoint).get("model_cfg")

    def stage_result(self, stage: str) -> dict | None:
        return self.results["stages"].get(stage)

    def save_results(self, stage: str | None = None, metrics: dict | None = None) -> Path:
        """Record ``metrics`` under ``stages.<stage>`` and rewrite results.json atomically."""
        if stage is not None:
            self.results["stages"][stage] = metrics
        self.results["name"] = self.run.name
        self.results["config"] = OmegaConf.to_container(self.cfg, resolve=True)
        self.results["provenance"] = self.provenance
        path = self.path(self.RESULTS)
        if is_main():  # under torchrun every rank holds the same results; one writes them
            write_json(path, self.results)
        return path
