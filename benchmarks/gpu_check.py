"""One prepared GPU check: tests, seed-ViT training, pipeline stages, benchmarks; JSON + log.

Steps, in priority order (each a subprocess with a timeout cut from what is left of
``--budget-s``; once the budget is spent the rest are marked ``skipped`` and the JSON is still
written, after every step)::

    gpu_tests       pytest -m gpu (junit XML -> passed / failed / skipped counts)
    data            decode the carried CIFAR-10 WebP parts (benchmarks/cifar_pack.py unpack)
    train           experiment=vit_cifar stages=[train,evaluate]: Adam 1e-4, cosine, batch 512,
                    crop + flip, bf16 autocast, train.compile=true, --epochs epochs
    hessian         stages=[hessian] on the trained model (a bounded estimator budget)
    ptq_seed_method experiment=vit_cifar_seed_method (W4A4 per-tensor dynamic min/max)
    int4_curve      stages=[int4_curve] (Hessian / measured / random INT4 orders)
    integer         stages=[ptq,integer] (W8A8 per-channel PTQ -> integer-only model)
    bench_integer   benchmarks/bench_integer.py (INT8 GEMM vs cuBLAS FP16, integer ViT, FP8)
    bench_hessian   benchmarks/bench_hessian.py on the trained model (HVP / fwd+bwd)

``--out`` receives ``gpu_check.json`` (every step's status, seconds, command, results), the
log ``gpu_check.log`` (all output), ``gpu_tests.xml``, ``metrics.csv``, ``hessian.json`` and
``int4_curve.json``: six files (the device tool returns at most 8). Runs, staged data and
caches go to ``--work``. No network is needed.

Staging the data (the device tool carries at most 64 MiB per call, repository included):
``python benchmarks/cifar_pack.py pack --out .gpucheck/data`` writes CIFAR-10 as lossless WebP
parts, ~105 MB in all: ``cifar10_webp_test.npz`` (~17.5 MB) and two ~44 MB training parts plus
a small third. One call carries ``.gpucheck`` with the test part and training part 1 (about
half the training set: enough for the check; ``gpu_check.json`` records how many images were
used). For the whole set, make two calls back to back (the machine stays warm ~30 s): the
first carries the other training parts and copies them to ``/root/hawq_parts``; the second
passes ``--data .gpucheck/data /root/hawq_parts``. A part missing from every folder (the
machine went cold in between) is reported, and training uses the parts found. The npz shards
themselves (47 MB each) would need four calls. Python packages missing on the device
(hydra-core, omegaconf, antlr4-python3-runtime, pyhessian) travel as wheels in ``.whl``.

``--device cpu --tiny`` is the dry run the default tests execute: tiny models, one epoch on
synthetic data (or on ``--data`` parts), the same commands at smoke sizes, in about a minute.

Usage::

    python benchmarks/gpu_check.py --out $OUT --budget-s 500 --epochs 100 --data .gpucheck/data
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --tiny --budget-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESERVE_S = 5.0  # kept back for writing the JSON after the last step


@dataclass
class Step:
    """One step: a command (or an in-process function), what it needs, how long it may run."""

    name: str
    cmd: list[str] | None = None
    fn: Callable[[float], dict] | None = None  # in-process; gets its timeout
    needs: list[Path] = field(default_factory=list)
    cap_s: float = 600.0  # longest it may take
    min_s: float = 10.0  # not started with less than this left
    collect: Callable[[], dict] | None = None  # results read after it ran (also on failure)
    ok_rcs: tuple[int, ...] = (0,)  # exit codes that count as "ok"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _copy(src: Path, out: Path) -> None:
    if src.is_file():
        shutil.copyfile(src, out / src.name)


def _junit(path: Path) -> dict:
    """Counts from pytest's junit XML: tests, failures, errors, skipped, failed test names."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _stage(run: Path, *names: str) -> Callable[[], dict]:
    return lambda: {n: _json(run / "results.json").get("stages", {}).get(n) for n in names}


def plan(args: argparse.Namespace, work: Path, out: Path) -> list[Step]:
    """The steps of this run (commands resolved; nothing started)."""
    py, tiny, run = sys.executable, args.tiny, work / "run"
    stage_dir = work / "cifar10"
    synthetic = tiny and not args.data
    hawq = [py, "-m", "hawq.run", "experiment=vit_cifar", "name=gpu_check", f"device={args.device}",
            f"paths.run_dir={run}", "seed=0"]  # fmt: skip
    if synthetic:
        data = ["data=synthetic", "data.train_subset=256", "data.test_subset=128"]
    else:
        # one device call carries train part 1 of 3: train on the parts that came (partial)
        data = [f"data.root={stage_dir}", "data.download=false", "data.partial=true"]
        if tiny:
            data += ["data.train_subset=256", "data.test_subset=128"]
    # experiment=vit_cifar holds out data.val_size=5000 train images (the split int4_curve
    # ranks on); at tiny size 64 of the 256
    size = ["model=vit_tiny", "data.val_size=64", "data.batch_size=64", "data.eval_batch_size=128",
            "quant.calib_batches=2", "quant.calib_batch_size=64"] if tiny else []  # fmt: skip
    hawq += size + data
    model = run / "model.pt"
    gpu_tests = ["tests/integer/test_triton_tiles.py"] if tiny else ["tests"]

    unpack = [py, "benchmarks/cifar_pack.py", "unpack", *args.data, "--dest", str(stage_dir),
              "--report", str(work / "data.json")]  # fmt: skip
    data_step = (Step("data", fn=lambda _t: {"synthetic": True}, min_s=0) if synthetic else
                 Step("data", unpack, cap_s=300, min_s=5,
                      collect=lambda: _json(work / "data.json")))  # fmt: skip

    hess = ["hessian.max_samples=100", "hessian.max_iter=30", "hessian.density_steps=20"]
    if tiny:
        hess = ["hessian.batch_size=32", "hessian.min_samples=3", "hessian.max_samples=6",
                "hessian.max_iter=5", "hessian.density_steps=5"]  # fmt: skip
    curve = ["curve.step=8", "curve.calib_batches=1"] if tiny else ["curve.step=4"]
    integer = ["integer.calib_batches=1", "integer.calib_batch_size=64"] if tiny else []
    seed = [a.replace("experiment=vit_cifar", "experiment=vit_cifar_seed_method") for a in hawq]
    seed = [a.replace(f"paths.run_dir={run}", f"paths.run_dir={run / 'seed_method'}")
            for a in seed] + [f"paths.checkpoint={model}"]  # fmt: skip
    bench_i = [py, "benchmarks/bench_integer.py", "--out", str(work / "bench_integer.json"),
               "--latency-out", str(work / "latency.json"),
               *(["--quick", "--iters", "2"] if tiny else ["--iters", "10"])]  # fmt: skip
    # bench_hessian trains its own micro ViT (exact per-op traces as the reference) and times
    # HVPs beside PyHessian on the host CPU; --threads 0 keeps torch's default thread count
    bench_h = [py, "benchmarks/bench_hessian.py", "--threads", "0", "--cache",
               str(work / "micro_vit.pt"), "--out", str(work / "bench_hessian.json"),
               *(["--seeds", "1", "--budgets", "40", "--train-steps", "20", "--reps", "1",
                  "--batch", "16", "--timing-models", "tiny"] if tiny else
                 ["--seeds", "3", "--reps", "3"])]  # fmt: skip
    return [
        Step("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors",  # a module needing a package
                           f"--junitxml={out / 'gpu_tests.xml'}", *gpu_tests],  # absent there
             cap_s=300, collect=lambda: _junit(out / "gpu_tests.xml"),
             ok_rcs=(0, 5)),  # 5: no test ran (every gpu test deselected or skipped)  # fmt: skip
        data_step,
        Step("train", hawq + ["stages=[train,evaluate]", f"train.epochs={args.epochs}",
                              f"train.compile={str(not tiny).lower()}"],
             needs=[] if synthetic else [stage_dir / "cifar10_test.npz"], cap_s=3600,
             collect=lambda: (_copy(run / "metrics.csv", out), _stage(run, "train",
                                                                      "evaluate")())[1]),
        Step("hessian", hawq + ["stages=[hessian]", *hess], needs=[model], cap_s=600,
             collect=lambda: (_copy(run / "hessian.json", out), _stage(run, "hessian")())[1]),
        Step("ptq_seed_method", seed, needs=[model], cap_s=300,
             collect=_stage(run / "seed_method", "ptq")),
        Step("int4_curve", hawq + ["stages=[int4_curve]", *curve], cap_s=600,
             needs=[model, run / "hessian.json"],
             collect=lambda: (_copy(run / "int4_curve.json", out),
                              _stage(run, "int4_curve")())[1]),  # fmt: skip
        Step("integer", hawq + ["stages=[ptq,integer]", *integer], needs=[model], cap_s=600,
             collect=_stage(run, "ptq", "integer")),
        Step("bench_integer", bench_i, cap_s=900,
             collect=lambda: _json(work / "bench_integer.json")),
        Step("bench_hessian", bench_h, needs=[model], cap_s=300,
             collect=lambda: _json(work / "bench_hessian.json")),
    ]  # fmt: skip


def _run_cmd(cmd: list[str], timeout: float, log, env: dict[str, str]) -> tuple[int | None, bool]:
    """Run ``cmd`` in its own process group; kill the group at the timeout. (rc, timed out)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return None, True


def run_steps(steps: list[Step], budget_s: float, out: Path, meta: dict) -> dict:
    """Run ``steps`` in order within ``budget_s``; write ``gpu_check.json`` after each."""
    t0, report = time.monotonic(), {**meta, "budget_s": budget_s, "steps": {}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dest = out / "gpu_check.json"
    with open(out / "gpu_check.log", "a", buffering=1) as log:
        for step in steps:
            left = budget_s - (time.monotonic() - t0) - RESERVE_S
            rec: dict = {"status": "skipped"}
            missing = [str(p) for p in step.needs if not p.exists()]
            if left < step.min_s:
                rec["reason"] = f"budget: {max(left, 0):.0f} s left"
            elif missing:
                rec["reason"] = f"missing {', '.join(missing)}"
            else:
                timeout = min(step.cap_s, left)
                rec = {"timeout_s": round(timeout, 1), "cmd": step.cmd and " ".join(step.cmd)}
                print(f"\n===== {step.name} (timeout {timeout:.0f} s) =====", file=log, flush=True)
                start = time.monotonic()
                if step.cmd is not None:
                    rc, timed_out = _run_cmd(step.cmd, timeout, log, env)
                    rec["rc"] = rc
                    rec["status"] = "timeout" if timed_out else (
                        "ok" if rc in step.ok_rcs else "failed")
                else:
                    try:
                        rec["result"] = step.fn(timeout)
                        rec["status"] = "ok"
                    except Exception as e:  # noqa: BLE001 - recorded; the next steps still run
                        rec["status"], rec["error"] = "failed", f"{type(e).__name__}: {e}"
                        print(f"{step.name}: {rec['error']}", file=log)
                rec["seconds"] = round(time.monotonic() - start, 2)
                if step.collect is not None:
                    rec["result"] = step.collect()
            print(f"[gpu_check] {step.name}: {rec['status']} {rec.get('reason', '')}", flush=True)
            report["steps"][step.name] = rec
            report["elapsed_s"] = round(time.monotonic() - t0, 2)
            tmp = dest.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
            tmp.replace(dest)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="gpu_check.json, gpu_check.log and artifacts")
    ap.add_argument("--work", default=None, help="runs, staged data (default: <out>/../work)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall clock for all steps")
    ap.add_argument("--epochs", type=int, default=None, help="default 100 (--tiny: 1)")
    ap.add_argument("--data", nargs="*", default=None,
                    help="folders holding cifar10_webp_*.npz parts (default .gpucheck/data; "
                         "with --tiny, synthetic images unless given)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, smoke sizes (CPU dry run)")
    ap.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.tiny else 100
    if args.data is None:
        args.data = [] if args.tiny else [".gpucheck/data"]
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / f"{out.name}_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    args.data = [str((REPO / d).resolve()) if not Path(d).is_absolute() else d for d in args.data]
    steps = plan(args, work, out)
    if args.only:
        keep = set(args.only.split(","))
        steps = [s for s in steps if s.name in keep]
    meta = {"schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": vars(args), "python": sys.version.split()[0], "host": os.uname().nodename}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001 - the report says why
        meta["torch_error"] = str(e)
    report = run_steps(steps, args.budget_s, out, meta)
    bad = [n for n, r in report["steps"].items() if r["status"] in ("failed", "timeout")]
    print(f"[gpu_check] {out / 'gpu_check.json'}; failed or timed out: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
