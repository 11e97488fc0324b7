"""Artifact I/O: atomic writes (temp file + rename) and readers with clear errors.

Every artifact a stage writes goes through these helpers so a run killed midway
never leaves a half-written file behind. A full disk or a read-only directory ends in
a one-line :class:`HawqError` (and no partial file). :func:`track_writes` lists what a
stage wrote (its completion record hashes them, :mod:`hawq.stages.record`).

Test hook: ``HAWQ_KILL_AFTER=<file name>`` makes the process SIGKILL itself right
after an artifact of that name is in place (crash-consistency tests).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from hawq.errors import HawqError

_TRACKERS: list[list[Path]] = []
KILL_ENV = "HAWQ_KILL_AFTER"


@contextmanager
def track_writes() -> Iterator[list[Path]]:
    """Collect the path of every artifact written through this module inside the block."""
    written: list[Path] = []
    _TRACKERS.append(written)
    try:
        yield written
    finally:
        _TRACKERS.remove(written)


def _written(path: Path) -> None:
    for tracker in _TRACKERS:
        tracker.append(path)
    if os.environ.get(KILL_ENV) == path.name:  # crash-consistency test hook
        os.kill(os.getpid(), signal.SIGKILL)


def write_error(path: Path, e: OSError) -> HawqError:
    """One line for a failed write: the path, the OS reason and what helps."""
    hint = {errno.ENOSPC: "free some space or point paths.run_dir elsewhere",
            errno.EDQUOT: "free some space or point paths.run_dir elsewhere",
            errno.EROFS: "the file system is read-only; set paths.run_dir to a writable folder",
            errno.EACCES: "no write permission; set paths.run_dir to a writable folder",
            errno.EPERM: "no write permission; set paths.run_dir to a writable folder",
            errno.ENOTDIR: "a parent is a regular file, not a folder"}.get(e.errno, "")  # fmt: skip
    reason = e.strerror or type(e).__name__
    return HawqError(f"cannot write {path}: {reason}" + (f"; {hint}" if hint else ""))


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (torch.save reports a full disk as a RuntimeError raised
    while handling it)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        os_error = _os_error(e)
        if os_error is not None:
            raise write_error(path, os_error) from e
        raise
    _written(path)
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
    except OSError as e:
        raise HawqError(f"cannot read YAML {path}: {e.strerror or e}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HawqError(f"cannot read YAML {path}: {_yaml_problem(e)}; allowed: a YAML "
                        "document") from e  # fmt: skip


def _yaml_problem(e: Exception) -> str:
    """One line for a YAML parse error: the problem and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


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
