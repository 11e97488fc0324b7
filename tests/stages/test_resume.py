"""A training run killed at any point resumes to the same final weights and metrics."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ..conftest import REPO

# dropout on: its random stream must resume exactly too
ARGS = ["experiment=smoke", "stages=[train]", "train.epochs=6", "data.train_subset=1024",
        "data.test_subset=128", "model.dropout=0.1"]  # fmt: skip


def start(run_dir, env=None):
    return subprocess.Popen([sys.executable, "-m", "hawq.run", *ARGS, f"paths.run_dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # fmt: skip


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("resume") / "full"
    proc = start(run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    return run_dir


def wait_for_state(proc, run_dir):
    state = run_dir / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    return state


def same_model(a_dir, b_dir):
    a = torch.load(a_dir / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(b_dir / "model.pt", weights_only=False)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_equals_uninterrupted(full, tmp_path):
    killed = tmp_path / "killed"

    proc = start(killed)
    state = wait_for_state(proc, killed)
    proc.send_signal(signal.SIGKILL)  # in the middle of epoch 2
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "model.pt").exists()
    assert torch.load(state, weights_only=False)["epoch"] < 6

    proc = start(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert metrics(killed) == metrics(full)
    assert same_model(full, killed)


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(full, tmp_path):
    """SIGINT in an epoch: one line, exit 130, the last epoch's state intact; rerun resumes
    to the uninterrupted run's weights."""
    run_dir = tmp_path / "interrupted"
    proc = start(run_dir)
    state = wait_for_state(proc, run_dir)
    # Stop the run the moment its first epoch is saved, so the signal lands inside a later
    # epoch however loaded the machine is (a sleep here raced the run on a busy CPU).
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None and not (run_dir / "model.pt").exists(), "the run ended early"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().decode()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("hawq: interrupted (Ctrl-C)")
    saved = torch.load(state, weights_only=False)  # intact: loads, a finished epoch
    assert 1 <= saved["epoch"] < 6 and len(saved["history"]) == saved["epoch"]
    assert not (run_dir / "model.pt").exists() and not list(run_dir.glob(".*.tmp"))

    proc = start(run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert metrics(run_dir) == metrics(full)
    assert same_model(full, run_dir)


@pytest.mark.parametrize(("sig", "at"), [(signal.SIGTERM, 20), (signal.SIGUSR1, 47)])
def test_preemption_signal_saves_mid_epoch_and_resumes_bit_for_bit(full, tmp_path, sig, at):
    """SIGTERM (Slurm/Kubernetes/timeout) or SIGUSR1 (Slurm requeue) inside an epoch (the
    process signals itself after step ``at`` of 16 per epoch: an exact instant on any
    machine): the step finishes, a mid-epoch state is written, one line, exit 128 + signal;
    the same command resumes inside that epoch and ends with the uninterrupted run's
    weights and metrics."""
    run_dir = tmp_path / "preempted"
    name = signal.Signals(sig).name
    proc = start(run_dir, {"HAWQ_SIGNAL_AT_STEP": f"{at}:{name}"})
    assert proc.wait(timeout=300) == 128 + sig
    err = proc.stderr.read().decode()
    assert "Traceback" not in err
    epoch, step = divmod(at, 16)
    assert err.strip().splitlines()[-1].startswith(
        f"hawq: stopped by {name}; train state at step {step} of epoch {epoch + 1}")
    saved = torch.load(run_dir / "train_state.pt", weights_only=False)
    assert saved["epoch"] == epoch and saved["partial"]["progress"]["step"] == step
    assert not (run_dir / "model.pt").exists() and not list(run_dir.glob(".*.tmp"))

    proc = start(run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert metrics(run_dir) == metrics(full)
    assert same_model(full, run_dir)
