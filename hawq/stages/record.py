"""Stage completion records: a stage is done only when everything it wrote is in place.

A stage first writes its artifacts (each atomically, :mod:`hawq.io`), then the
pipeline writes one record, atomically and last, ``<run_dir>/records/<stage>.json``::

    {"stage", "fingerprint", "config": {key: value}, "inputs": {path: sha256 | null},
     "outputs": {path: sha256}, "metrics": {...}}

``fingerprint = sha256(json(config, inputs))`` where ``config`` holds the values of the
config keys the stage reads (its ``CONTRACT``, :mod:`hawq.stages.contract`) and ``inputs``
the SHA-256 of each input artifact (``null`` when absent: a ``bits.yaml`` appearing later
changes the ``ptq`` fingerprint). :func:`check` says whether the stage is done: its record
exists, every recorded output still has its hash, and the fingerprint equals the current
one. A killed run therefore redoes the stage it was in, however late the kill came, and a
stage's ``results.json`` entry (restored from the record when missing) always
describes the config that made its artifacts.

A config key that hawq gained after a record was written, still at its packaged default
(``conf/<group>/<default option>.yaml``), is not a change: the stage stays done
(upgrading hawq does not redo or refuse finished stages).

When the fingerprint changed while the outputs are intact, cheap stages are redone
(with one log line naming the changed keys); the stages that train weights
(``Contract.keep``: ``train``, ``qat``) refuse instead with one line naming the changed
keys: ``force=true`` redoes them (overwriting), a new ``name=`` keeps both.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hawq.config import CONF_DIR
from hawq.distributed import is_main
from hawq.errors import HawqError
from hawq.io import read_json, write_json
from hawq.stages.context import Context
from hawq.stages.contract import QAT_MODEL, Contract, checkpoint, run_files

log = logging.getLogger("hawq")
DIR = "records"
_MISSING = "<absent>"


def _contract(stage: str) -> Contract | None:
    """The ``CONTRACT`` the stage's module declares (None for an unknown name)."""
    try:
        module = importlib.import_module(f"hawq.stages.{stage}")
    except ModuleNotFoundError:
        return None
    return getattr(module, "CONTRACT", None)


def keeps_weights(stage: str) -> bool:
    """Whether ``stage`` trains weights (refuses to overwrite them on a config change)."""
    c = _contract(stage)
    return bool(c and c.keep)


#: A stage without a contract depends on every config key but these.
_NOT_READ = ("stages", "force", "name", "device", "paths", "hydra")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_hash(path: Path) -> str | None:
    return sha256(path) if path.is_file() else None


def spec_keys(stage: str) -> tuple[str, ...]:
    """The config keys ``stage`` reads (every group for a stage without a contract)."""
    c = _contract(stage)
    if c is not None:
        return c.keys
    return (
        "model",
        "data",
        "train",
        "hessian",
        "quant",
        "qat",
        "alloc",
        "integer",
        "latency",
        "curve",
        "landscape",
    )


def spec(stage: str, ctx: Context) -> Contract:
    """The stage's contract (a stage without one reads every config key and the FP
    checkpoint)."""
    c = _contract(stage)
    if c is not None:
        return c
    return Contract(tuple(k for k in ctx.cfg if k not in _NOT_READ), (checkpoint,))


def config_values(stage: str, ctx: Context) -> dict[str, Any]:
    """``{key: resolved value}`` of the config keys ``stage`` reads (``<absent>`` if unset)."""
    out = {}
    for key in spec(stage, ctx).keys:
        value = OmegaConf.select(ctx.cfg, key, default=_MISSING)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = value
    if spec(stage, ctx).machine:
        from hawq.integer.isa import describe

        out["machine"] = describe()
    return out


def _key(ctx: Context, p: Path) -> str:
    """A file's name in a record: relative to the run directory when inside it (a moved
    or copied run directory keeps its records valid), else absolute."""
    p = Path(p).resolve()
    try:
        return str(p.relative_to(ctx.run_dir))
    except ValueError:
        return str(p)


def _file(ctx: Context, key: str) -> Path:
    return ctx.run_dir / key if not Path(key).is_absolute() else Path(key)


def input_hashes(stage: str, ctx: Context) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for fn in spec(stage, ctx).inputs:
        for p in fn(ctx):
            out[_key(ctx, p)] = _file_hash(p)
    return out


def fingerprint(config: dict[str, Any], inputs: dict[str, str | None]) -> str:
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def path(ctx: Context, stage: str) -> Path:
    return ctx.path(DIR) / f"{stage}.json"


def load(ctx: Context, stage: str) -> dict | None:
    """The record of ``stage`` in this run directory, or None (missing or unreadable)."""
    p = path(ctx, stage)
    if not p.is_file():
        return None
    try:
        rec = read_json(p)
    except HawqError:
        return None
    return rec if isinstance(rec, dict) and "fingerprint" in rec else None


@dataclass
class Status:
    """Outcome of :func:`check`: ``done``, or why not (``reason``) and which keys changed."""

    done: bool
    reason: str
    changed: list[str] = field(default_factory=list)
    outputs_intact: bool = False


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


@functools.cache
def _group_defaults(group: str) -> Any:
    """The packaged default option of a config group (None for a top-level key or when the
    group has no file)."""
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    for item in root.get("defaults", []):
        if OmegaConf.is_dict(item) and group in item and item[group]:
            f = CONF_DIR / group / f"{item[group]}.yaml"
            return OmegaConf.load(f) if f.is_file() else None
    return None


def added_at_default(old: dict, new: dict) -> set[str]:
    """Dotted keys of ``new`` absent from ``old`` whose value is the packaged default."""
    a, b = _flat(old), _flat(new)
    out = set()
    for key in set(b) - set(a):
        group, _, rest = key.partition(".")
        conf = _group_defaults(group) if rest else None
        if conf is None:
            continue
        value = OmegaConf.select(conf, rest, default=_MISSING, throw_on_missing=False)
        if OmegaConf.is_config(value):
            continue
        if value is not _MISSING and value == b[key]:
            out.add(key)
    return out


def changed_keys(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ, as ``key=old -> new`` (but those in ``ignore``)."""
    a, b = _flat(old), _flat(new)
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [
        f"{k}={a.get(k, _MISSING)!r} -> {b.get(k, _MISSING)!r}"
        for k in keys
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def check(ctx: Context, stage: str, config_only: bool = False) -> Status:
    """Is ``stage`` done in this run directory with the current config and inputs?

    ``config_only``: compare the config keys only (inputs may still be remade by earlier
    stages of this run); a missing record or changed outputs then give no changed keys.
    """
    rec = load(ctx, stage)
    if rec is None:
        return Status(False, "no completion record")
    for p, digest in rec.get("outputs", {}).items():
        if _file_hash(_file(ctx, p)) != digest:
            return Status(False, f"output {p} is missing or changed since it was written")
    config = config_values(stage, ctx)
    old_config = rec.get("config", {})
    if config_only:
        changed = changed_keys(old_config, config, added_at_default(old_config, config))
        return Status(
            not changed,
            "config changed" if changed else "config unchanged",
            changed,
            outputs_intact=True,
        )
    inputs = input_hashes(stage, ctx)
    if fingerprint(config, inputs) == rec["fingerprint"]:
        return Status(True, "up to date", outputs_intact=True)
    newer = added_at_default(old_config, config)  # keys hawq gained since, at their defaults
    changed = changed_keys(old_config, config, newer)
    old_inputs = rec.get("inputs", {})
    changed += [
        f"input {Path(p).name} changed"
        for p in sorted(set(old_inputs) | set(inputs))
        if old_inputs.get(p, _MISSING) != inputs.get(p, _MISSING)
    ]
    if not changed and newer:
        return Status(
            True,
            f"up to date ({len(newer)} newer config key(s) at their defaults)",
            outputs_intact=True,
        )
    return Status(
        False,
        "made with a different config or inputs",
        changed or ["(unknown)"],
        outputs_intact=True,
    )


def refuse_or_redo(ctx: Context, stage: str, status: Status) -> None:
    """Log why ``stage`` runs again, or refuse (weight-training stages whose record and outputs are
    intact but were made with other config/inputs)."""
    what = ", ".join(status.changed[:6]) + (" ..." if len(status.changed) > 6 else "")
    if keeps_weights(stage) and status.outputs_intact and status.changed:
        raise HawqError(
            f"{stage}: the outputs in {ctx.run_dir} were made with other settings "
            f"({what}); force=true redoes {stage} and overwrites them, a new name= "
            "(or paths.run_dir=) keeps both"
        )
    if status.changed:
        log.info("%s: redone, %s: %s", stage, status.reason, what)
    else:
        log.info("%s: %s, running it", stage, status.reason)


def begin(ctx: Context, stage: str) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Config values and input hashes before ``stage`` runs (what its outputs derive from)."""
    return config_values(stage, ctx), input_hashes(stage, ctx)


def commit(
    ctx: Context,
    stage: str,
    before: tuple[dict, dict],
    written: list[Path],
    metrics: dict[str, Any],
) -> Path:
    """Write the record of a finished stage: last, atomically; hashes of what it wrote."""
    config, inputs = before
    skip = {ctx.path(ctx.RESULTS).resolve(), ctx.path(DIR).resolve()}
    outputs = {}
    for p in written:
        p = Path(p).resolve()
        if p.is_file() and p not in skip and p.parent not in skip:
            outputs[_key(ctx, p)] = sha256(p)
    rec = {
        "stage": stage,
        "fingerprint": fingerprint(config, inputs),
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics,
    }
    return write_json(path(ctx, stage), rec)


#: weight-training stage -> (its trained outputs, its resumable state file)
_ADOPT: dict[str, tuple[Callable[[Context], list[Path]], str]] = {
    "train": (checkpoint, "train_state.pt"),
    "qat": (run_files(QAT_MODEL), "qat_state.pt"),
}


def remove_finished_state(ctx: Context, stage: str) -> None:
    """A done ``train``/``qat`` stage's resumable state file is a leftover: delete it."""
    if stage in _ADOPT and is_main():
        ctx.path(_ADOPT[stage][1]).unlink(missing_ok=True)


def adopt(ctx: Context, stage: str) -> bool:
    """Keep trained weights made without a record (an older hawq, or a given checkpoint):
    ``train``/``qat`` whose output exists with no record and no resumable state file get
    a record of the current config, so they are not retrained. Returns True when adopted.
    (A run killed after writing them still has its state file: it resumes instead.)"""
    if stage not in _ADOPT or load(ctx, stage) is not None:
        return False
    outputs_fn, state = _ADOPT[stage]
    outputs = outputs_fn(ctx)
    if ctx.path(state).is_file():
        return False
    if not outputs or not all(p.is_file() for p in outputs):
        return False
    metrics = ctx.stage_result(stage) or {"adopted": [str(p) for p in outputs]}
    commit(ctx, stage, begin(ctx, stage), outputs, metrics)
    log.warning(
        "%s: %s has no completion record (older hawq or a given file); kept as is "
        "(force=true retrains)",
        stage,
        ", ".join(str(p) for p in outputs),
    )
    return True
