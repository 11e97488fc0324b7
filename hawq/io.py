"""Artifact I/O: atomic writes (temp file + rename) and readers with clear errors.

Every artifact a stage writes goes through these helpers so a run killed midway
never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from hawq.errors import HawqError


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(Path(path), lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON with sorted-insertion order preserved and 2-space indent."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise HawqError(f"missing file {path}") from e
    except (OSError, ValueError) as e:
        raise HawqError(f"cannot read JSON {path}: {e}") from e


def write_yaml(path: str | Path, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml(path: str | Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise HawqError(f"missing file {path}") from e
    except (OSError, yaml.YAMLError) as e:
        raise HawqError(f"cannot read YAML {path}: {e}") from e


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically."""
    return _atomic(Path(path), lambda f: torch.save(obj, f))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with a one-line error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise HawqError(f"missing checkpoint {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors vary
        raise HawqError(f"corrupt checkpoint {path}: {type(e).__name__}: {e}") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "as_dict"):
        return o.as_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
