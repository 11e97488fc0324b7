"""One writer per run directory: an advisory lock held while the pipeline runs.

Two processes pointed at the same run directory (a sweep whose points share
``paths.run_dir``, or the same command started twice) would overwrite each
other's artifacts or both skip stages whose outputs the other is writing. The
pipeline holds an exclusive, non-blocking ``flock`` on ``<run_dir>/.hawq.lock``;
a second process fails at once with one line naming the holder. The kernel drops
the lock when its process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType
from typing import IO

from hawq.errors import HawqError

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
            raise HawqError(f"run directory {self.run_dir} is in use by another hawq process "
                            f"(host/pid {holder}, lock {self.path}); wait for it, or give this "
                            "run its own paths.run_dir=...")  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()}/{os.getpid()}\n")
        f.flush()
        self._file = f
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
