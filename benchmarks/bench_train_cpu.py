"""Training step time on the CPU: fp32 vs bf16 autocast vs bf16 autocast + torch.compile.

The issue-12 question: how much does bf16 autocast (AMX-BF16 on this Xeon) buy a training
step, and does ``torch.compile`` add to it? Models: the seed ViT (``conf/model/vit_cifar``)
and the CPU study's ViT (``conf/model/vit_cifar_cpu``), built from their config files, at
the study's batch 128 (random images; step time does not depend on pixel values).

    python benchmarks/bench_train_cpu.py --out benchmarks/results/train_cpu.json

Each mode is timed in ``--repeat`` alternating blocks of ``--steps`` steps (after warm-up
steps; compile's cold start is reported separately) so that a load change on a shared
machine hits every mode; the JSON holds the median step time per mode and the ratios
fp32 / bf16 and fp32 / (bf16 + compile). The peer in the same run is torch fp32 eager.
``--clock cpu`` (with ``--threads 1``) times process CPU seconds instead of wall seconds:
the work done, whatever else loads a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from hawq.config import CONF_DIR
from hawq.provenance import provenance

CONF = CONF_DIR / "model"
MODES = ("fp32", "bf16", "bf16_compile")


def build(name: str) -> nn.Module:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.dropout = 0.0  # what the CPU recipe trains with; dropout is pure elementwise cost
    return instantiate(cfg)


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if mode == "bf16_compile" else model
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = loss_fn(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_model(name: str, batch: int, steps: int, repeat: int, warmup: int,
                clock=time.perf_counter) -> dict:  # fmt: skip
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    models = {m: build(name) for m in MODES}
    steppers, cold = {}, {}
    for mode in MODES:
        models[mode].train()
        steppers[mode] = make_step(models[mode], mode, x, y)
        t0 = time.perf_counter()
        for _ in range(warmup):
            steppers[mode]()
        cold[mode] = time.perf_counter() - t0
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeat):
        for mode in MODES:
            t0 = clock()
            for _ in range(steps):
                steppers[mode]()
            times[mode].append((clock() - t0) / steps)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "model": name,
        "params": sum(p.numel() for p in models["fp32"].parameters()),
        "batch": batch,
        "step_s": med,
        "step_s_all": times,
        "warmup_s": cold,
        "ratio_fp32_over_bf16": med["fp32"] / med["bf16"],
        "ratio_fp32_over_bf16_compile": med["fp32"] / med["bf16_compile"],
        "epoch_min_bf16": med["bf16"] * (50_000 // batch) / 60,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_cifar_cpu", "vit_cifar"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--out", default="benchmarks/results/train_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        row = bench_model(name, args.batch, args.steps, args.repeat, args.warmup, clock)
        rows.append(row)
        st = row["step_s"]
        print(f"{name}: step fp32 {st['fp32']:.3f} s, bf16 {st['bf16']:.3f} s,"
              f" bf16+compile {st['bf16_compile']:.3f} s | fp32/bf16 "
              f"{row['ratio_fp32_over_bf16']:.2f}x, fp32/(bf16+compile) "
              f"{row['ratio_fp32_over_bf16_compile']:.2f}x", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance(torch.device("cpu"))
    out.write_text(json.dumps({"bench": "train_cpu", "threads": args.threads,
                               "clock": args.clock, "results": rows,
                               "provenance": prov}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
