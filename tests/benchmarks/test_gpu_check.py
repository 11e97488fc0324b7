"""benchmarks/gpu_check.py: the CPU dry run of the prepared GPU check, and its budget rules.

The dry run (``--device cpu --tiny``) executes every step's real command at smoke sizes, so
the script cannot rot before a GPU is lent; the budget tests check that steps past the budget
are skipped, that a step past its timeout is killed with its child processes, and that the
JSON is written either way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import cifar_pack  # noqa: E402
import gpu_check  # noqa: E402

STEPS = ["gpu_tests", "data", "train", "hessian", "ptq_seed_method", "int4_curve", "integer",
         "bench_integer", "bench_hessian"]  # fmt: skip


def _report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper (killed, not yet collected)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.slow  # ~60 s on 2 cores: the default run stays near 10 minutes
def test_cpu_dry_run_runs_every_step(tmp_path):
    """Every step's real command at smoke sizes, the data staged from packed WebP parts."""
    g = np.random.default_rng(0)
    images = lambda n: g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    labels = lambda n: g.integers(0, 10, n).astype(np.int64)  # noqa: E731
    cifar_pack.pack(images(300), labels(300), images(150), labels(150), tmp_path / "parts",
                    part_mb=0.5, workers=2)  # fmt: skip
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out",
                          str(out), "--device", "cpu", "--tiny", "--budget-s", "1200",
                          "--data", str(tmp_path / "parts")],
                         cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1500)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = _report(out)
    assert list(rep["steps"]) == STEPS
    bad = {n: s for n, s in rep["steps"].items() if s["status"] != "ok"}
    assert not bad, (bad, (out / "gpu_check.log").read_text()[-4000:])
    steps = rep["steps"]
    assert {"tests", "failures", "skipped"} <= set(steps["gpu_tests"]["result"])
    assert steps["data"]["result"]["train_images"] == 300
    assert steps["data"]["result"]["test_images"] == 150
    assert steps["train"]["result"]["train"]["epochs"] == 1
    assert 0 <= steps["train"]["result"]["evaluate"]["fp"]["acc"] <= 100
    assert steps["hessian"]["result"]["hessian"]["trace_samples"] >= 3
    assert steps["ptq_seed_method"]["result"]["ptq"]["quantized"]["n"] > 0
    assert set(steps["int4_curve"]["result"]["int4_curve"]["max_share_within"]) == {
        "hessian", "measured", "random"}
    assert "agreement" in json.dumps(steps["integer"]["result"]["integer"])
    assert "cpu_reference" in steps["bench_integer"]["result"]
    assert steps["bench_hessian"]["result"]["hvp"]
    # what comes back from the device: <= 8 plain files, tame names, no sub-folders needed
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"gpu_check.json", "gpu_check.log", "hessian.json", "int4_curve.json"} <= set(files)


def test_spent_budget_skips_every_step_and_still_writes(tmp_path):
    t = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path / "o"), "--device", "cpu", "--tiny",
                           "--budget-s", "0"]) == 0  # fmt: skip
    assert time.monotonic() - t < 5
    rep = _report(tmp_path / "o")
    assert list(rep["steps"]) == STEPS
    for s in rep["steps"].values():
        assert s["status"] == "skipped" and s["reason"].startswith("budget")


def test_missing_inputs_skip_the_step(tmp_path):
    gpu_check.main(["--out", str(tmp_path / "o"), "--device", "cpu", "--tiny", "--only",
                    "hessian,int4_curve,bench_hessian"])  # fmt: skip
    rep = _report(tmp_path / "o")
    assert list(rep["steps"]) == ["hessian", "int4_curve", "bench_hessian"]
    for s in rep["steps"].values():
        assert s["status"] == "skipped" and "model.pt" in s["reason"]


def test_timeout_kills_the_step_and_its_children_then_goes_on(tmp_path):
    pid_file = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time; "
               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")  # fmt: skip
    steps = [
        gpu_check.Step("slow", [sys.executable, "-c", sleeper], cap_s=3.0, min_s=0.0),
        gpu_check.Step("fast", [sys.executable, "-c", "print('ok')"], min_s=0.0),
        gpu_check.Step("late", [sys.executable, "-c", "print('never')"], min_s=1e9),
    ]
    t = time.monotonic()
    rep = gpu_check.run_steps(steps, budget_s=60, out=tmp_path, meta={})
    assert time.monotonic() - t < 30
    assert [rep["steps"][n]["status"] for n in ("slow", "fast", "late")] == [
        "timeout", "ok", "skipped"]
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert _dead(child)  # the grandchild died with its process group
    assert _report(tmp_path)["steps"]["slow"]["status"] == "timeout"
