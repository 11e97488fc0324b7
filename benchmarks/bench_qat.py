"""QAT step time vs FP step time (training epoch ratio), JSON out.

Peer in the same run: the FP model on the same batches. Target (issue 5): QAT epoch
<= 1.3x the FP epoch on GPU for the seed ViT (``--model seed``).

    python benchmarks/bench_qat.py --model tiny --steps 20 --batch 64 --out bench_qat.json
    python benchmarks/bench_qat.py --model seed --steps 50 --batch 512 --device cuda [--compile]

``--repeat R`` alternates FP and QAT timing blocks R times (so a load change on a
shared machine hits both) and reports the median step time of each and their ratio;
``--threads`` pins the CPU thread count; ``--clock cpu`` times process CPU seconds
instead of wall seconds (with ``--threads 1``: the work done, whatever else loads the
machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from hawq.models import ViT
from hawq.provenance import provenance
from hawq.quant import OpSetting, Plan, calibrate, quantize_


def model_of(kind: str) -> nn.Module:
    if kind == "tiny":
        return ViT(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0)
    return ViT()  # seed: dim 512, depth 6


def time_steps(model: nn.Module, x, y, steps: int, device: torch.device, amp: bool,
               clock=time.perf_counter) -> float:  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step():
        ctx = torch.autocast("cuda", torch.bfloat16) if amp and device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        with ctx:
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "seed"], default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="lsq")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here (default: stdout only)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating FP/QAT timing blocks")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (CPU only; robust to other load on the machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    fp = model_of(a.model).to(dev)
    q = model_of(a.model).to(dev)
    q.load_state_dict(fp.state_dict())
    quantize_(q, Plan(OpSetting(w_bits=a.bits, a_bits=a.bits)), method=a.method)
    calibrate(q, [(x, y)])
    amp = not a.no_amp
    if a.compile:
        fp, q = torch.compile(fp), torch.compile(q)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    fps, qs = [], []
    for _ in range(max(a.repeat, 1)):
        fps.append(time_steps(fp, x, y, a.steps, dev, amp, clock))
        qs.append(time_steps(q, x, y, a.steps, dev, amp, clock))
    t_fp, t_q = statistics.median(fps), statistics.median(qs)
    out = {"model": a.model, "method": a.method, "bits": a.bits, "batch": a.batch,
           "steps": a.steps, "repeat": a.repeat, "threads": torch.get_num_threads(),
           "compile": a.compile, "clock": a.clock, "device": str(dev), "fp_step_s": t_fp,
           "qat_step_s": t_q,
           "ratio": t_q / t_fp, "ratios": [b / f for f, b in zip(fps, qs)],
           "target_ratio_gpu": 1.3, "provenance": provenance(dev)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=2))


if __name__ == "__main__":
    main()
