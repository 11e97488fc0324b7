"""Crash consistency: kill -9 right after a stage's main artifact appears (before its
completion record), rerun the same command, and end with the same artifacts and metrics
as an uninterrupted run (bit for bit: every stage is deterministic on one CPU thread)."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ..conftest import REPO

ARGS = ["experiment=smoke", "stages=[train,evaluate,hessian,qat]", "data.train_subset=128",
        "data.test_subset=64", "train.epochs=2", "qat.epochs=1", "hessian.max_samples=6",
        "hessian.min_samples=3", "hessian.density=false"]  # fmt: skip
# wall-clock fields: the only ones allowed to differ
TIMES = {"wall_s", "seconds", "img_per_s", "train_seconds", "traces_s", "backend_timings_s",
         "provenance", "timings", "measured_s"}  # fmt: skip


def run(run_dir, kill_after=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HAWQ_KILL_AFTER", None)
    if kill_after:
        env["HAWQ_KILL_AFTER"] = kill_after
    return subprocess.run([sys.executable, "-m", "hawq.run", *ARGS, f"paths.run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def load(path, run_dir):
    """JSON with the run directory's own path replaced (the two runs live apart)."""
    return json.loads(path.read_text().replace(str(run_dir), "<run_dir>"))


def rows(path):
    with open(path) as f:
        return strip(list(csv.DictReader(f)))


def same(a, b) -> bool:
    """Bit-for-bit equality of nested checkpoints (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.slow
def test_kill_after_each_main_artifact_then_rerun_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run(full)
    assert proc.returncode == 0, proc.stderr

    for artifact, stage in (("model.pt", "train"), ("hessian.json", "hessian"),
                            ("qat_model.pt", "qat")):  # fmt: skip
        proc = run(killed, kill_after=artifact)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert (killed / artifact).is_file()
        assert not (killed / "records" / f"{stage}.json").exists()
    proc = run(killed)
    assert proc.returncode == 0, proc.stderr

    a = load(full / "results.json", full)["stages"]
    b = load(killed / "results.json", killed)["stages"]
    assert list(b) == ["train", "evaluate", "hessian", "qat"]
    assert strip(a) == strip(b)
    for name in ("model.pt", "qat_model.pt"):
        ca, cb = (torch.load(d / name, weights_only=False) for d in (full, killed))
        assert same(ca["state_dict"], cb["state_dict"]), name
        assert strip(ca.get("meta")) == strip(cb.get("meta")), name
    ha = load(full / "hessian.json", full)
    hb = load(killed / "hessian.json", killed)
    assert strip(ha) == strip(hb)
    pngs = sorted(p.name for p in full.glob("*.png"))
    assert pngs == sorted(p.name for p in killed.glob("*.png"))
    assert len(list(killed.glob("hessian_*.png"))) >= 4
    for name in ("metrics.csv", "qat_metrics.csv"):
        assert rows(full / name) == rows(killed / name), name
    assert not list(killed.glob("*_state.pt")) and not list(killed.glob(".*.tmp"))
