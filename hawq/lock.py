"""One writer per run directory: an advisory lock held while the pipeline runs.

Two processes pointed at the same run directory (a sweep whose points share
``paths.run_dir``, or the same command started twice) would overwrite each
other's artifacts or both skip stages whose outputs the other is writing. The
pipeline holds an exclusive, non-blocking ``flock`` on ``<run_dir>/.hawq.lock``;
a second process fails at once with one line naming the holder. The kernel drops
the lock when its process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import IO

from hawq.errors import HawqError

log = logging.getLogger("hawq")

LOCK_NAME = ".hawq.lock"

try:  # POSIX
    import fcntl

    def _try_lock(f: IO[str]) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(f: IO[str]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _try_lock(f: IO[str]) -> bool:
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(f: IO[str]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete the temp files of atomic writes (``.<name>.*.tmp``) anywhere in ``run_dir``.

    Called with the lock held: only the holder writes in the run directory, so a temp file
    found now was left by a write that was killed, however young it is."""
    from hawq.io import TMP_SUFFIX

    removed = []
    for tmp in run_dir.rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info(
            "removed %d temp file(s) of killed writes: %s",
            len(removed),
            ", ".join(p.name for p in removed[:5]),
        )
    return removed


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` -- exclusive use of ``run_dir`` or a :class:`HawqError`.

    The lock file records ``host pid`` of the holder for the error message of
    the process that is refused. Only the torchrun rank 0 (or a plain process)
    locks: the ranks of one job share its run directory by design.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.path = self.run_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def __enter__(self) -> RunDirLock:
        if int(os.environ.get("RANK", "0")) != 0:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        if not _try_lock(f):
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise HawqError(
                f"run directory {self.run_dir} is in use by another hawq process "
                f"(host/pid {holder}, lock {self.path}); wait for it, or give this "
                "run its own paths.run_dir=..."
            )
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()}/{os.getpid()}\n")
        f.flush()
        self._file = f
        remove_stale_temps(self.run_dir)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            _unlock(self._file)
            self._file.close()
            self._file = None
