"""QAT step time vs FP step time (training epoch ratio), JSON out.

Peer in the same run: the FP model on the same batches. Target (issue 5): QAT epoch
<= 1.3x the FP epoch on GPU for the seed ViT (``--model seed``).

    python benchmarks/bench_qat.py --model tiny --steps 20 --batch 64 --out bench_qat.json
    python benchmarks/bench_qat.py --model seed --steps 50 --batch 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
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


def time_steps(model: nn.Module, x, y, steps: int, device: torch.device, amp: bool) -> float:
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
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "seed"], default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="lsq")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--out", default="bench_qat.json")
    a = ap.parse_args()
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
    t_fp = time_steps(fp, x, y, a.steps, dev, amp)
    t_q = time_steps(q, x, y, a.steps, dev, amp)
    out = {"model": a.model, "method": a.method, "bits": a.bits, "batch": a.batch,
           "steps": a.steps, "device": str(dev), "fp_step_s": t_fp, "qat_step_s": t_q,
           "ratio": t_q / t_fp, "target_ratio_gpu": 1.3, "provenance": provenance(dev)}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=2))


if __name__ == "__main__":
    main()
