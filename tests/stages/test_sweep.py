"""Multirun: one run directory per point, a lock per run directory, bad points fail alone."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hawq.errors import HawqError
from hawq.lock import LOCK_NAME, RunDirLock
from hawq.pipeline import run_pipeline
from hawq.run import CONF_DIR
from hawq.sweep import drop_unknown_options

from ..conftest import REPO, run_cli

TINY = ["data=synthetic", "model=vit_tiny", "stages=[train]", "data.train_subset=64",
        "data.test_subset=64", "data.batch_size=32"]  # fmt: skip


def test_sweep_points_get_own_dirs_and_bad_points_fail_alone(tmp_path):
    """4 points: 2 valid (seed 0, 1), 1 invalid value, 1 unknown model; each named once."""
    proc = run_cli("-m", *TINY, "model=vit_tiny,no_such_model", "seed=0,1", "train.epochs=1",
                   "train.warmup_epochs=0,1",
                   f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hawq: error:")]
    # model=no_such_model dropped up front (one line, not one per seed); warmup_epochs=1 with
    # epochs=1 is invalid for both seeds; then the one-line summary.
    assert errors[0].startswith("hawq: error: sweep point model=no_such_model: unknown model")
    bad = [ln for ln in errors if "train.warmup_epochs=1" in ln and "is invalid" in ln]
    assert len(bad) == 2 and all("seed=0" in ln or "seed=1" in ln for ln in bad)
    assert errors[-1].startswith("hawq: error: 3 sweep point(s) failed: model=no_such_model; #")
    assert len(errors) == 4, errors
    models = sorted(tmp_path.glob("multirun/default/*/model.pt"))
    assert [m.parent.name for m in models] == [
        f"data.batch_size=32,data.test_subset=64,data.train_subset=64,data=synthetic,"
        f"model=vit_tiny,seed={s},train.epochs=1,train.warmup_epochs=0" for s in (0, 1)]
    assert models[0].read_bytes() != models[1].read_bytes(), "two seeds, two trainings"
    assert not (tmp_path / "default").exists(), "nothing written to the shared default run dir"


def test_unknown_group_options_are_dropped_per_point():
    argv = ["-m", "model=vit_tiny,nope,resnet20", "data=choice(synthetic,zzz)", "seed=1,2",
            "model.dim=3", "hydra/launcher=joblib", "stages=[train]"]  # fmt: skip
    kept, failed = drop_unknown_options(argv, CONF_DIR)
    assert kept == ["-m", "model=vit_tiny,resnet20", "data=synthetic", "seed=1,2", "model.dim=3",
                    "hydra/launcher=joblib", "stages=[train]"]  # fmt: skip
    assert [f.split(":")[0] for f in failed] == ["model=nope", "data=zzz"]
    with pytest.raises(HawqError, match="unknown model 'x'; available: custom, resnet20"):
        drop_unknown_options(["-m", "model=x,y"], CONF_DIR)


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from hawq.lock import RunDirLock\n"
            f"with RunDirLock({str(run_dir)!r}):\n"
            "    print('locked', flush=True); time.sleep(120)\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, make_cfg):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(HawqError) as info:
            run_pipeline(make_cfg(*TINY, "train.epochs=1", run_dir=run_dir))
        msg = str(info.value)
        assert "\n" not in msg and f"run directory {run_dir} is in use" in msg
        assert f"/{holder.pid}" in msg and "paths.run_dir" in msg
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME], "nothing else written"
        with pytest.raises(HawqError, match="in use"):
            RunDirLock(run_dir).__enter__()
        with RunDirLock(tmp_path / "other"):  # other directories are free
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with RunDirLock(run_dir) as lock:  # the kernel dropped the dead holder's lock
        assert lock.path.read_text().strip().endswith(f"/{os.getpid()}")
    with RunDirLock(run_dir), pytest.raises(HawqError, match="in use"):
        RunDirLock(run_dir).__enter__()  # exclusive even within one process


def test_cli_reports_a_busy_run_dir_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        proc = run_cli(*TINY, "train.epochs=1", f"paths.run_dir={run_dir}", cwd=tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"hawq: error: run directory {run_dir} is in use")


def test_named_points_keep_their_folders_and_a_shared_one_is_refused(tmp_path):
    """``'name=x_${seed}'`` -> runs/x_0, runs/x_1 (studies rely on it); ``name=fixed`` with
    two seeds -> the second point fails naming the first instead of skipping on its files."""
    proc = run_cli("-m", *TINY, "train.epochs=1", "seed=0,1", "name=x_${seed}",
                   f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "x_0" / "model.pt").is_file() and (tmp_path / "x_1" / "model.pt").is_file()

    proc = run_cli("-m", *TINY, "train.epochs=1", "seed=0,1", "name=fixed",
                   f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hawq: error:")]
    assert len(errors) == 2 and "seed=1" in errors[0] and "already holds sweep point" in errors[0]
    assert "seed=0" in errors[0].split("already holds")[1]
    assert errors[1].startswith("hawq: error: 1 sweep point(s) failed: #1 (")
