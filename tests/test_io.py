"""Artifact files: modes follow the umask, killed writes leave no litter, renames are fsynced."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hawq import io

REPO = Path(__file__).resolve().parent.parent
WRITERS = {
    "json": lambda p: io.write_json(p, {"a": 1}),
    "yaml": lambda p: io.write_yaml(p, {"a": [1, 2]}),
    "text": lambda p: io.write_text(p, "x"),
    "torch": lambda p: io.save_torch(p, {"w": torch.ones(3)}),
}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027, 0o000])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_artifact_mode_follows_umask(tmp_path, umask, mask, kind):
    """Like open(): mode == 0o666 & ~umask (mkstemp alone gives 0600), also when overwriting."""
    umask(mask)
    path = tmp_path / f"a.{kind}"
    for _ in range(2):  # a new file, then an atomic replace of an existing one
        WRITERS[kind](path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
        plain = tmp_path / "plain"
        plain.write_text("reference")
        assert stat.S_IMODE(plain.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)


def _temps(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


def test_killed_write_leaves_a_temp_that_the_next_write_cleans(tmp_path):
    """SIGKILL mid-write leaves ``.name.*.tmp``; once stale, the next write of it removes it."""
    target = tmp_path / "big.json"
    code = (
        "import sys, time; from hawq import io\n"
        "def slow(f):\n"
        "    f.write(b'{'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"io._atomic(__import__('pathlib').Path({str(target)!r}), slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = _temps(tmp_path, "big.json")
    assert len(left) == 1 and not target.exists(), "the kill leaves exactly the temp file"

    fresh = tmp_path / ".big.json.live.tmp"  # a concurrent live write: recent mtime, kept
    fresh.write_bytes(b"{")
    other = tmp_path / ".other.json.x.tmp"  # another artifact's temp: not ours to judge
    other.write_bytes(b"{")
    old = time.time() - 2 * io.STALE_TMP_S
    os.utime(left[0], (old, old))
    os.utime(other, (old, old))
    io.write_json(target, {"ok": True})
    assert io.read_json(target) == {"ok": True}
    assert _temps(tmp_path, "big.json") == [fresh]
    assert other.exists()


def test_clean_stale_temps_matches_only_its_file(tmp_path):
    """``a.json``'s cleaner spares ``ab.json``'s temps and names with glob characters work."""
    names = ["a.json", "ab.json", "x[1].pt", "x1.pt"]
    old = time.time() - 2 * io.STALE_TMP_S
    for n in names:
        t = tmp_path / f".{n}.k3y.tmp"
        t.write_bytes(b"")
        os.utime(t, (old, old))
    assert io.clean_stale_temps(tmp_path, "a.json") == 1
    assert io.clean_stale_temps(tmp_path, "x[1].pt") == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".ab.json.k3y.tmp", ".x1.pt.k3y.tmp"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    path = io.write_json(tmp_path / "r.json", {"v": 1})

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io._atomic(path, boom)
    assert io.read_json(path) == {"v": 1}
    assert _temps(tmp_path, "r.json") == []


@pytest.mark.skipif(os.name != "posix", reason="directory fsync is POSIX")
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch, kind):
    """The real os.fsync is called on the file and then on its directory, after the rename."""
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", (tmp_path / f"a.{kind}")
                       .exists()))  # fmt: skip
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    WRITERS[kind](tmp_path / f"a.{kind}")
    assert synced == [("file", False), ("dir", True)]
