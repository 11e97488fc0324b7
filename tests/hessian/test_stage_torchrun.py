"""The hessian stage under ``torchrun --nproc_per_node 2`` equals one process (gloo, CPU)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hawq.pipeline import run_pipeline

from ..conftest import REPO

ARGS = ["experiment=smoke", "stages=[hessian]", "hessian.activation=false",
        "hessian.density=false", "hessian.batches=2", "data.train_subset=256"]  # fmt: skip


def test_two_ranks_equal_one_process(make_cfg, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_pipeline(make_cfg(*ARGS[:1], "stages=[train]", "data.train_subset=256",
                          "train.epochs=1", run_dir=one))  # fmt: skip
    two.mkdir()
    shutil.copy(one / "model.pt", two / "model.pt")
    run_pipeline(make_cfg(*ARGS, run_dir=one))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "hawq.run", *ARGS, f"paths.run_dir={two}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((d / "hessian.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for name, ea in a["ops"].items():
        eb = b["ops"][name]
        assert ea["trace_samples"] == eb["trace_samples"]
        if ea["trace"] is not None:
            assert eb["trace"] == pytest.approx(ea["trace"], rel=1e-4)
            assert eb["eigenvalues"][0] == pytest.approx(ea["eigenvalues"][0], rel=1e-4)
