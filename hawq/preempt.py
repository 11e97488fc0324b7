"""Preemption: SIGTERM (what Slurm, Kubernetes and ``timeout`` send before killing) and
SIGUSR1 (Slurm's requeue signal with ``--signal=USR1@<s>``) stop a run cleanly.

Inside a training loop (:func:`graceful`) the signal only sets a flag: the loop finishes
the step it is in, the stage writes a mid-epoch resumable state and raises
:class:`Stopped`. Anywhere else the handler raises :class:`Stopped` at once, as Ctrl-C
does. The command line prints one line and exits with ``128 + signal number`` (143 for
SIGTERM, 138 for SIGUSR1); the same command resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_state = {"requested": 0, "graceful": 0, "steps": 0}
#: Test hook: ``HAWQ_SIGNAL_AT_STEP=<n>[:<SIGNAL>]`` makes the process send itself the signal
#: (default SIGTERM) right after its n-th training step: a preemption at an exact instant.
STEP_ENV = "HAWQ_SIGNAL_AT_STEP"


class Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """The run was asked to stop by ``signum``; ``where`` says what was kept."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(signum, where)
        self.signum = signum
        self.where = where

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, _frame: object) -> None:
    _state["requested"] = signum
    if not _state["graceful"]:
        raise Stopped(signum)


def install() -> None:
    """Handle :data:`SIGNALS` in this process (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)


def requested() -> int:
    """The signal asking this run to stop, or 0."""
    return int(_state["requested"])


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Inside the block a stop signal only sets :func:`requested` (the loop checks it after
    each step); one that is still pending when the block ends normally is raised there."""
    _state["graceful"] += 1
    try:
        yield
    finally:
        _state["graceful"] -= 1
    if requested() and not _state["graceful"]:
        raise Stopped(requested())


def step_done() -> None:
    """Count a training step (the :data:`STEP_ENV` test hook fires here)."""
    _state["steps"] += 1
    hook = os.environ.get(STEP_ENV)
    if hook:
        at, _, name = hook.partition(":")
        if int(at) == _state["steps"]:
            os.kill(os.getpid(), signal.Signals[name or "SIGTERM"])


def stop_if_requested(stage: str, epoch: int, path: object, step: int = 0) -> None:
    """Raise :class:`Stopped` when a stop signal is pending, saying where ``stage``'s state
    was kept: after ``epoch`` finished epochs, or at ``step`` of the next one."""
    if not requested():
        return
    where = f"at step {step} of epoch {epoch + 1}" if step else f"after epoch {epoch}"
    raise Stopped(requested(), f"{stage} state {where} in {path}")
