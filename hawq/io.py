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
import glob
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from hawq.errors import HawqError

TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a temp file untouched this long belongs to a killed write, not a live one


def _umask() -> int:
    """The process umask: from ``/proc`` on Linux, else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # not thread-safe, hence the /proc route first
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX: fsync the directory entry)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is all we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def clean_stale_temps(directory: str | Path, name: str, max_age_s: float = STALE_TMP_S) -> int:
    """Delete ``.<name>.*.tmp`` files left in ``directory`` by a write that was killed.

    A temp file is stale when it was last modified more than ``max_age_s`` ago
    (a live write touches its file continuously). Returns how many were removed.
    """
    removed = 0
    for tmp in Path(directory).glob(f".{glob.escape(name)}.*{TMP_SUFFIX}"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


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
    hint = {
        errno.ENOSPC: "free some space or point paths.run_dir elsewhere",
        errno.EDQUOT: "free some space or point paths.run_dir elsewhere",
        errno.EROFS: "the file system is read-only; set paths.run_dir to a writable folder",
        errno.EACCES: "no write permission; set paths.run_dir to a writable folder",
        errno.EPERM: "no write permission; set paths.run_dir to a writable folder",
        errno.ENOTDIR: "a parent is a regular file, not a folder",
    }.get(e.errno, "")
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
    """Write through a temp file in the same directory, then rename over ``path``.

    The file gets mode ``0o666 & ~umask`` like any ``open()``-created file
    (``mkstemp`` alone would leave 0600); the data and the directory entry are
    fsynced, and stale temp files of earlier killed writes are removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        if hasattr(os, "fchmod"):  # not on Windows, where mkstemp's mode is moot
            os.fchmod(fd, 0o666 & ~_umask())
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
    _fsync_dir(path.parent)
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
        raise HawqError(
            f"cannot read YAML {path}: {_yaml_problem(e)}; allowed: a YAML document"
        ) from e


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
    """Load a checkpoint safely (``weights_only=True``, see :mod:`hawq.safe_load`).

    One-line errors for missing, corrupt or refused (code-carrying) files.
    """
    from hawq.safe_load import safe_load  # imports the model packages: keep io light

    return safe_load(path, map_location)


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


def write_csv(path: str | Path, fields: list[str], rows: list[dict]) -> Path:
    """``rows`` as a CSV with header ``fields``, written atomically (:func:`write_text`)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())
