"""Time the C++ kernels of the ``cpu`` backend on the calls of one real forward (issue 28).

Records every ``hawq_int_cpu`` call (``requant``, ``attention_int8``, ``layernorm``, ...) of
one batch-64 forward of the integer seed ViT (or ResNet-20), then replays each kernel's
calls and prints the milliseconds per forward (minimum over ``--reps`` replays, interleaved
across variants so that all see the same load of this shared machine). ``--compare
NEW=OLD`` also times ``ext().OLD`` on the same calls and checks that both give the same
tensors: the way a rewritten kernel is compared with the one it replaces while both are
bound in the extension (issue 28 kept ``requant_old``, ``attention_int8_old`` and
``layernorm_old`` until the comparison was recorded, then removed them).

Usage::

    python benchmarks/bench_cpu_epilogues.py [--model vit|resnet] [--reps 15]
                                             [--compare requant=requant_old ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_integer_cpu as B  # noqa: E402

from hawq.integer import cpu, ops  # noqa: E402


class Recorder:
    """Stands in for the extension module: forwards every call and keeps its arguments."""

    def __init__(self, mod) -> None:
        self.mod, self.calls = mod, []

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def call(*args):
            kept = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((name, kept))
            return fn(*args)

        return call


def record(kind: str, batch: int) -> list:
    model = B.build(kind)
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    im = B.convert(B.fake_quant(model, calib, 8), [(calib,)])
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    real = cpu.ext()
    rec = Recorder(real)
    with torch.inference_mode(), ops.backend("cpu"):
        im(x)  # warm-up: kernel choice, caches
        cpu.ext = lambda: rec  # noqa: E731
        try:
            im(x)
        finally:
            cpu.ext = lambda: real  # noqa: E731
    return rec.calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--compare", nargs="*", default=[], help="NEW=OLD kernel names")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu.keep_freed_memory()
    calls = record(a.model, a.batch)
    ext = cpu.ext()
    pairs = dict(c.split("=") for c in a.compare)
    names = sorted({n for n, _ in calls})
    # (label, recorded kernel whose calls are replayed, function timed on them)
    variants = [(n, n, n) for n in names]
    variants += [(f"{old} (old)", new, old) for new, old in pairs.items() if new in names]
    for new, old in pairs.items():  # same results, bit for bit
        for n, args in calls:
            if n == new:
                x, y = getattr(ext, new)(*args), getattr(ext, old)(*args)
                assert x.dtype == y.dtype and torch.equal(x, y), f"{new} != {old}"
    best = {label: float("inf") for label, _, _ in variants}
    with torch.inference_mode():
        for _ in range(a.reps):
            for label, src, fn_name in variants:
                fn = getattr(ext, fn_name)
                todo = [args for n, args in calls if n == src]
                t = time.perf_counter()
                for args in todo:
                    fn(*args)
                best[label] = min(best[label], time.perf_counter() - t)
    counts = {n: sum(1 for c, _ in calls if c == n) for n in names}
    print(f"load average {os.getloadavg()[0]:.2f}; ms per forward (min of {a.reps}):")
    for label, src, _ in variants:
        print(f"  {label:28s} {best[label] * 1e3:8.2f}  ({counts[src]} calls)")


if __name__ == "__main__":
    main()
