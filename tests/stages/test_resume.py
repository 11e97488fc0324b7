"""A training run killed at any point resumes to the same final weights and metrics."""

import csv
import os
import signal
import subprocess
import sys
import time

import torch

from ..conftest import REPO

# dropout on: its random stream must resume exactly too
ARGS = ["experiment=smoke", "stages=[train]", "train.epochs=6", "data.train_subset=512",
        "data.test_subset=128", "model.dropout=0.1"]  # fmt: skip


def start(run_dir):
    return subprocess.Popen([sys.executable, "-m", "hawq.run", *ARGS, f"paths.run_dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = start(full)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    proc = start(killed)
    state = killed / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # in the middle of epoch 2
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "model.pt").exists()
    assert torch.load(state, weights_only=False)["epoch"] < 6

    proc = start(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert metrics(killed) == metrics(full)
    a = torch.load(full / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
