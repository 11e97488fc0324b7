"""Curvature engine benchmark, named peers in the same run (JSON out).

1. Trace accuracy per product: all-op traces of a TRAINED micro ViT (the seed ViT's op
   layout: patch embedding, qkv/proj/fc1/fc2 per block, head; trained here for
   ``--train-steps`` steps on CIFAR-10, cached) against EXACT per-op traces (``e_i``
   columns of every weight block), as the aggregate relative error
   ``sum_l |t_l - t*_l| / sum_l |t*_l|`` (mean over ``--seeds``) at ``--budgets`` Hessian-
   vector products: our old default (Hutchinson, all ops from one product per sample),
   Hutch++ and the new default ``sandwich`` (sketch ``min(40, B/3)``), and curvlinops'
   ``hutchpp_trace`` / ``xtrace`` run on every op's block operator with ``B / #ops``
   products each (curvlinops estimates one trace per operator).
2. HVP time / (forward + backward) time (eval, float32, one batch) on the tiny and a wider
   ViT: ours reusing the first-order graph (one column, and vmapped over 8/16 columns per
   call, per column), ``torch.func`` jvp-of-grad, PyHessian's HVP, curvlinops'
   ``HessianLinearOperator`` (one column and 16), plus where the time of one double
   backward goes (profiler, top ops).

Peers: ``pip install --no-deps curvlinops-for-pytorch einops einconv backpack-for-pytorch
unfoldNd opt-einsum linear_operator`` (``--no-deps``: backpack requires torchvision, which
would replace the installed torch) and ``pip install --no-deps pyhessian``.

Usage::

    PYTHONPATH=. python benchmarks/bench_hessian.py --out benchmarks/results/hessian_cpu.json
    PYTHONPATH=. python benchmarks/bench_hessian.py --timing-only   # part 2 only, ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_integer_cpu import interleaved  # beside this script (its directory is on sys.path)
from torch import nn

from hawq.hessian.hutchinson import block_traces
from hawq.hessian.operator import HessianOperator
from hawq.integer import isa
from hawq.models import ViT

MODELS = {
    "micro": dict(image_size=32, patch_size=8, dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.0),
    "tiny": dict(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0),
    "wide": dict(dim=192, depth=2, heads=4, mlp_dim=384, dropout=0.0),
}
CIFAR = Path("/work/shared/data/cifar10")


def cifar(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images (normalised float32) and labels; synthetic when absent."""
    g = torch.Generator().manual_seed(seed)
    parts = sorted(CIFAR.glob("cifar10_train_part*.npz"))
    if not parts:
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    d = np.load(parts[0])
    idx = torch.randperm(len(d["y"]), generator=g)[:n].numpy()
    x = torch.from_numpy(d["x"][idx]).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.25
    return x, torch.from_numpy(d["y"][idx]).long()


def trained_micro(steps: int, cache: Path) -> tuple[nn.Module, dict]:
    """The micro ViT after ``steps`` Adam steps (batch 128) on CIFAR-10; cached."""
    torch.manual_seed(0)
    model = ViT(**MODELS["micro"])
    if cache.is_file():
        model.load_state_dict(torch.load(cache))
        return model.eval(), {"cached": str(cache)}
    x, y = cifar(steps * 128 if steps * 128 <= 16000 else 16000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn, losses = nn.CrossEntropyLoss(), []
    start = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(y), (128,))
        loss = loss_fn(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval(), {"steps": steps, "train_s": time.perf_counter() - start,
                          "loss_first_last": [losses[0], float(np.mean(losses[-20:]))]}


def exact_traces(op: HessianOperator) -> dict[str, float]:
    """Per-op trace from identity columns of each block (vmapped, ``numel`` products)."""
    out = {}
    for name, s in op.blocks.items():
        blk, n, tr = op.block(name), s.stop - s.start, 0.0
        for start in range(0, n, 64):
            cols = torch.arange(start, min(start + 64, n))
            e = torch.zeros(n, len(cols), dtype=op.dtype)
            e[cols, torch.arange(len(cols))] = 1.0
            tr += float((blk @ e)[cols, torch.arange(len(cols))].double().sum())
        out[name] = tr
    return out


def agg_err(est: dict[str, float], ref: dict[str, float]) -> float:
    return sum(abs(est[k] - ref[k]) for k in ref) / sum(abs(v) for v in ref.values())


def bench_accuracy(op: HessianOperator, ref: dict, budgets: list[int], seeds: int) -> dict:
    out: dict[str, dict] = {}
    try:
        from curvlinops import hutchpp_trace, xtrace
    except ImportError as e:
        hutchpp_trace = xtrace = None
        out["curvlinops_error"] = f"{type(e).__name__}: {e}"
    n_ops = len(op.blocks)
    for b in budgets:
        row: dict[str, float] = {}
        sk = min(40, b // 3)
        ours = {"hutchinson_old_default": ("hutchinson", 0), "hutchpp": ("hutchpp", sk),
                "sandwich_new_default": ("sandwich", sk)}  # fmt: skip
        for label, (est, m) in ours.items():
            errs = []
            for seed in range(seeds):
                res = block_traces(op, rtol=1e-12, max_samples=b - 2 * m, min_samples=b - 2 * m,
                                   seed=seed, estimator=est, sketch=max(m, 1), chunk=16)
                assert res.n_products == b
                errs.append(agg_err({k: e.mean for k, e in res.blocks.items()}, ref))
            row[label] = statistics.mean(errs)
        if hutchpp_trace is not None:
            per_op = b // n_ops
            for label, fn, mult in (("curvlinops_hutchpp_per_op", hutchpp_trace, 3),
                                    ("curvlinops_xtrace_per_op", xtrace, 2)):
                mv = per_op - per_op % mult
                errs = []
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    est = {k: float(fn(op.block(k), num_matvecs=mv)) for k in op.blocks}
                    errs.append(agg_err(est, ref))
                row[label] = statistics.mean(errs)
                row[label + "_products"] = mv * n_ops
        out[str(b)] = row
        print(f"budget {b}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return out


def timeit(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_hvp(model: nn.Module, batch, reps: int) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    ops = {b: HessianOperator(model, loss_fn, [batch], backend=b)
           for b in ("double_backward", "func")}  # fmt: skip
    db = ops["double_backward"]
    v = torch.randn(db.size)
    pyh = _pyhessian_product(model, loss_fn, batch)
    out: dict = {"params": db.size}
    # interleaved, so that all see the same machine state (run order alone moved a ratio by
    # ~0.5x): forward+backward, our product, PyHessian's (its own graph, kept meanwhile)
    fns = [fwd_bwd, lambda: db @ v] + ([pyh] if callable(pyh) else [])
    times = interleaved(fns, reps)
    base, out["ours_reuse_graph_s"] = times[0], times[1]
    out["fwd_bwd_s"] = base
    if callable(pyh):
        out["pyhessian_s"] = times[2]
    else:
        out["pyhessian_error"] = pyh
    pyh = None  # frees its graph
    for k in (8, 16):
        vk = torch.randn(db.size, k)
        out[f"ours_vmapped_{k}_per_vector_s"] = timeit(lambda vk=vk: db @ vk, reps) / k
    out["ours_func_s"] = timeit(lambda: ops["func"] @ v, max(1, reps // 2))
    out["profile_double_backward_top_ops"] = profile_hvp(db, v)
    db.release()
    params = db.params
    model.zero_grad(set_to_none=True)
    try:
        from curvlinops import HessianLinearOperator

        cl = HessianLinearOperator(model, loss_fn, params, [batch], progressbar=False,
                                   check_deterministic=False)  # fmt: skip
        out["curvlinops_s"] = timeit(lambda: cl @ v, max(1, reps // 2))
        v16 = torch.randn(db.size, 16)
        out["curvlinops_16_per_vector_s"] = timeit(lambda: cl @ v16, 1, warmup=1) / 16
    except Exception as e:  # noqa: BLE001
        out["curvlinops_error"] = f"{type(e).__name__}: {e}"
    for k in list(out):
        if k.endswith("_s") and k != "fwd_bwd_s":
            out[k[:-2] + "_over_fwd_bwd"] = round(out[k] / base, 3)
    return out


def _pyhessian_product(model: nn.Module, loss_fn, batch):
    """PyHessian's product on its own first-order graph, as a no-argument call; or the
    error that stopped it (a peer's failure is a result, not a crash)."""
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        model.zero_grad(set_to_none=True)
        ph = PyHessian(model, loss_fn, data=batch, cuda=False)
        pv = [torch.randn_like(p) for p in ph.params]
        return lambda: hessian_vector_product(ph.gradsH, ph.params, pv)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def profile_hvp(op: HessianOperator, v: torch.Tensor, top: int = 8) -> list:
    """Self CPU time of the top ops of one reuse-graph product (share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    op @ v
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op @ v
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [[e.key, round(e.self_cpu_time_total / total, 3)] for e in rows[:top]]


def _accuracy(args) -> dict:
    """Part 1: trace error per product budget on the trained micro ViT vs exact traces."""
    model, train_info = trained_micro(args.train_steps, Path(args.cache))
    batch = cifar(args.batch, seed=7)
    op = HessianOperator(model, nn.CrossEntropyLoss(), [batch])
    start = time.perf_counter()
    ref = exact_traces(op)
    result = {
        "model": {"vit": MODELS["micro"], **train_info, "weights": op.size,
                  "ops": len(op.blocks)},
        "exact_reference_s": time.perf_counter() - start,
        "exact_traces": ref,
        "metric": "mean over seeds of sum_l |t_l - t*_l| / sum_l |t*_l|",
        "by_budget": bench_accuracy(op, ref, [int(b) for b in args.budgets.split(",")],
                                    args.seeds),
    }  # fmt: skip
    op.release()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", default="60,150,300")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--timing-models", default="tiny,wide")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: default)")
    ap.add_argument("--cache", default="/tmp/hawq_bench/micro_vit.pt")
    ap.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    ap.add_argument("--timing-only", action="store_true",
                    help="only part 2 (HVP time / fwd+bwd, peers in the same run)")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    result: dict = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": isa.model_name(), "isa": isa.describe(), "batch": args.batch,
        "load_average_at_start": os.getloadavg()[0],
        "note": "ratios are from the same run; absolute times depend on the machine's load",
    }  # fmt: skip
    if not args.timing_only:
        result["accuracy"] = _accuracy(args)
    result["hvp"] = {}
    g = torch.Generator().manual_seed(0)
    for name in args.timing_models.split(","):
        torch.manual_seed(0)
        m = ViT(**MODELS[name]).eval()
        b = (torch.randn(args.batch, 3, 32, 32, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g))  # fmt: skip
        result["hvp"][name] = {"vit": MODELS[name], **bench_hvp(m, b, args.reps)}
        print(name, {k: v for k, v in result["hvp"][name].items() if "over" in k}, flush=True)
    result["wall_s"] = time.perf_counter() - wall
    text = json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and
                      math.isnan(o) else str(o))  # fmt: skip
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
