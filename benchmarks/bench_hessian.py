"""Hessian engine speed, with named peers measured in the same run (JSON out).

1. HVP time / (forward + backward) time, same model and batch, eval mode: our
   double backward reusing the first-order graph, double backward rebuilding it
   per product (what a loader-average pays, and pyhessian's dataloader mode),
   ``torch.func`` forward-over-reverse, and pyhessian's single-batch HVP.
2. Per-op traces to the same number of samples: all ops from ONE full HVP per
   sample (ours) vs one HVP per op per sample (MQBench's way) vs pyhessian's
   whole-model ``trace()`` (one full HVP per sample, no per-op split): seconds,
   products and the worst relative standard error reached.

Usage::

    PYTHONPATH=. python benchmarks/bench_hessian.py --out bench.json    # tiny ViT on CPU
    PYTHONPATH=. python benchmarks/bench_hessian.py --model seed --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hawq.hessian.hutchinson import RunningStats, block_traces, rademacher
from hawq.hessian.hvp import DoubleBackwardHVP
from hawq.hessian.operator import HessianOperator
from hawq.models import ViT

MODELS = {
    "tiny": dict(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0),
    "seed": dict(dim=512, depth=6, heads=8, mlp_dim=512, dropout=0.0),
}


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` calls (the first products of a new
    graph are several times slower on CPU: allocator warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_hvp(model: nn.Module, batch, device: torch.device, reps: int) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    base = timeit(fwd_bwd, device, reps)
    model.zero_grad(set_to_none=True)
    ops = {b: HessianOperator(model, loss_fn, [batch], backend=b)
           for b in ("double_backward", "func")}  # fmt: skip
    v = torch.randn(ops["func"].size, device=device)
    out = {"fwd_bwd_s": base}
    out["hvp_double_backward_reuse_s"] = timeit(lambda: ops["double_backward"] @ v, device, reps)
    params = ops["func"].params
    vs = list(v.split([p.numel() for p in params]))
    vs = [c.view_as(p) for c, p in zip(vs, params)]
    idx = list(range(len(params)))
    out["hvp_double_backward_rebuild_s"] = timeit(
        lambda: DoubleBackwardHVP(model, loss_fn, params, batch)(vs, idx), device, reps
    )
    out["hvp_func_s"] = timeit(lambda: ops["func"] @ v, device, reps)
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        model.zero_grad(set_to_none=True)
        ph = PyHessian(model, loss_fn, data=batch, cuda=device.type == "cuda")
        pv = [torch.randn_like(p) for p in ph.params]
        out["hvp_pyhessian_s"] = timeit(lambda: hessian_vector_product(ph.gradsH, ph.params, pv),
                                        device, reps)  # fmt: skip
        model.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
        out["pyhessian_error"] = f"{type(e).__name__}: {e}"
    for k in list(out):
        if k.startswith("hvp_") and k.endswith("_s"):
            out[k.replace("_s", "_over_fwd_bwd")] = out[k] / base
    return out


def bench_traces(model: nn.Module, batch, device: torch.device, samples: int) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, [batch], backend="double_backward")
    for _ in range(3):  # build the cached graph and warm up outside the timings
        op @ torch.zeros(op.size, device=device)
    out = {"samples": samples, "ops": len(op.blocks), "params": op.size}

    start = time.perf_counter()
    n0 = op.n_hvp
    res = block_traces(op, rtol=1e-12, max_samples=samples, min_samples=samples, seed=0)
    out["all_layers"] = {
        "s": time.perf_counter() - start,
        "hvps": op.n_hvp - n0,
        "worst_rel_stderr": max(e.rel_stderr for e in res.blocks.values()),
    }

    start = time.perf_counter()
    n0 = op.n_hvp
    gen = torch.Generator().manual_seed(0)
    stats = {name: RunningStats(1) for name in op.blocks}
    for _ in range(samples):
        for name in op.blocks:
            blk = op.block(name)
            v = rademacher(blk.shape[0], gen, op.dtype, device)
            stats[name].add(torch.dot(v, blk @ v).reshape(1))
    out["per_layer"] = {
        "s": time.perf_counter() - start,
        "hvps": op.n_hvp - n0,
        "worst_rel_stderr": max(float(s.rel_stderr()[0]) for s in stats.values()),
    }
    try:
        from pyhessian import hessian as PyHessian

        model.zero_grad(set_to_none=True)
        ph = PyHessian(model, loss_fn, data=batch, cuda=device.type == "cuda")
        torch.manual_seed(0)
        start = time.perf_counter()
        # one sample per call: trace() stops early on a negative running mean
        vals = [s for _ in range(samples) for s in ph.trace(maxIter=1)]
        t = torch.tensor(vals, dtype=torch.float64)
        out["pyhessian_whole_model"] = {"s": time.perf_counter() - start, "hvps": samples,
                                        "rel_stderr": float(t.std() / len(t) ** 0.5 /
                                                            t.mean().abs())}  # fmt: skip
        model.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001
        out["pyhessian_error"] = f"{type(e).__name__}: {e}"
    out["per_layer_over_all_layers_time"] = out["per_layer"]["s"] / out["all_layers"]["s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--checkpoint", default=None, help="a hawq ViT checkpoint (trained weights)")
    ap.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        from hawq.checkpoint import load_model

        model = load_model(args.checkpoint, device)[0]
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.eval()
    else:
        model = ViT(**MODELS[args.model]).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (args.batch,), generator=g).to(device))  # fmt: skip
    result = {
        "model": args.checkpoint or args.model, "batch": args.batch, "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "hvp": bench_hvp(model, batch, device, args.reps),
        "traces": bench_traces(model, batch, device, args.samples),
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
