"""Build the C++ kernels at first use without ever hanging on a dead build.

``torch.utils.cpp_extension.load`` guards its build folder with a bare ``lock`` file
(created with ``O_EXCL``, no owner recorded) and waits, silently and forever, while it
exists. A process killed during the build (Ctrl-C in the first run, a test timeout, a
preempted job) leaves it behind, and every later process that needs the kernels hangs.

:func:`guarded_build` puts an ``fcntl.flock`` around torch's build: the kernel releases a
flock when its holder dies, so whoever holds ours is alive. Holding it, a ``lock`` file of
torch's can only be stale (every builder of this extension takes our lock first) and is
removed, with a line saying so. A live builder in another process is waited for with a
message naming its pid, never silently.

The build folder's name carries a short hash of torch's install path and version, so two
environments (virtualenvs with different torch builds) no longer rebuild each other's
extension in one shared folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("hawq")
OWNER = "hawq-build.lock"  # our flock file, beside torch's "lock"


def extension_name(base: str) -> str:
    """``base`` plus a hash of this torch (its path and version)."""
    key = f"{Path(torch.__file__).resolve().parent}|{torch.__version__}"
    return f"{base}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextlib.contextmanager
def owned(folder: Path) -> Iterator[None]:
    """Hold the flock of ``folder``; a torch ``lock`` found while holding it is stale."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / OWNER, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            log.warning(
                "hawq: waiting for process %s, which is building the C++ integer kernels in %s",
                holder,
                folder,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        stale = folder / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
            log.warning(
                "hawq: removed a stale build lock %s (left by a build that was "
                "killed); rebuilding the C++ integer kernels",
                stale,
            )
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def guarded_build(base: str, build: Callable[[str, Path], Any]) -> Any:
    """``build(name, folder)`` (a ``cpp_extension.load`` call) under :func:`owned`."""
    name = extension_name(base)
    folder = build_dir(name)
    try:
        import fcntl  # noqa: F401
    except ImportError:  # not POSIX: torch's own lock only
        return build(name, folder)
    with owned(folder):
        return build(name, folder)
