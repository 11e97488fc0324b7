"""The C++ kernels never hang on a lock: a lock left by a killed build is removed with a
message; a live builder is waited for with a message naming it."""

import fcntl
import os
import subprocess
import sys
import time

import pytest

from hawq.integer import build_lock, cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="cpu backend did not build")
LOAD = "from hawq.integer import cpu; cpu.ext(); print('built')"


def folder():
    return build_lock.build_dir(build_lock.extension_name("hawq_int_cpu"))


def test_a_lock_left_by_a_killed_build_is_removed_and_said():
    stale = folder() / "lock"
    stale.touch()  # what torch's FileBaton leaves when its process dies mid-build
    proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr
    assert "removed a stale build lock" in proc.stderr
    assert not stale.exists()


def test_a_live_builder_is_waited_for_by_name():
    with open(folder() / build_lock.OWNER, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # this process plays a build in progress
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        proc = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        line = proc.stderr.readline()  # blocks until the waiter says why it waits
        assert f"waiting for process {os.getpid()}" in line
        time.sleep(0.2)
        assert proc.poll() is None  # still waiting while we hold the lock
        fcntl.flock(f, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "built" in out, err
