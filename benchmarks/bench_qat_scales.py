"""Do LSQ step sizes survive Adam? Step-size optimizers compared, JSON out.

The measurement behind :mod:`hawq.quant.scale_optim`: a tiny ViT is trained FP on
synthetic data, then QAT (LSQ, every op) runs the same steps with three ways of updating
the step sizes ``s``: Adam on ``s`` (``adam_linear``, hawq before issue 12), Adam on
``log s`` (``adam_log``, :class:`~hawq.quant.scale_optim.QATAdam`) and SGD on ``s`` with
LSQ's gradient scale (``sgd_linear``, LSQ's own recipe). Weights always use Adam at
``--lr``. Reported per run: the share of weight / activation step sizes that flipped sign
or collapsed (``s <= 1e-7``) at any point, the smallest ``s / s_0``, ``collapsed_ops`` at
the end, and the mean training loss of the last 20 steps.

    python benchmarks/bench_qat_scales.py --steps 150 --out bench_qat_scales.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

from hawq.data.module import ImageData
from hawq.models import ViT
from hawq.provenance import provenance
from hawq.quant import OpSetting, Plan, calibrate, collapsed_ops, quantize_, quantizers
from hawq.quant.scale_optim import QATAdam


def train_batches(data: ImageData, seed: int, steps: int):
    """``steps`` training batches, cycling over epochs of the seeded loader."""
    loader = data.train_loader(seed=seed)
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done >= steps:
                return


def fp_model(steps: int, data: ImageData) -> nn.Module:
    torch.manual_seed(0)
    model = ViT(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in train_batches(data, 0, steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def qat_run(fp: nn.Module, data: ImageData, bits: int, how: str, steps: int, lr: float,
            qparam_lr: float) -> dict:  # fmt: skip
    torch.manual_seed(1)
    model = quantize_(copy.deepcopy(fp), Plan(OpSetting(w_bits=bits, a_bits=bits)), "lsq")
    calibrate(model, data.eval_loader("train", batch_size=128), 2)
    qs = quantizers(model)
    scales = {n: q.scale for n, q in qs.items()}
    s0 = {n: s.detach().clone() for n, s in scales.items()}
    sid = {id(s) for s in scales.values()}
    weights = [p for p in model.parameters() if id(p) not in sid]
    groups = [{"params": weights, "lr": lr, "log_space": False}]
    if how == "sgd_linear":
        opt = QATAdam(groups)
        sgd = torch.optim.SGD(list(scales.values()), lr=qparam_lr)
    else:
        groups.append({"params": list(scales.values()), "lr": qparam_lr,
                       "log_space": how == "adam_log"})  # fmt: skip
        opt, sgd = QATAdam(groups), None
    bad: set[str] = set()
    min_ratio = float("inf")
    losses = []
    model.train()
    for x, y in train_batches(data, 1, steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if sgd is not None:
            sgd.zero_grad()
        loss.backward()
        opt.step()
        if sgd is not None:
            sgd.step()
        losses.append(float(loss.detach()))
        for n, s in scales.items():
            if bool((s.detach() <= 1e-7).any()):
                bad.add(n)
            min_ratio = min(min_ratio, float((s.detach() / s0[n]).min()))
    w = [n for n in qs if qs[n].is_weight]
    a = [n for n in qs if not qs[n].is_weight]
    return {
        "bits": bits, "how": how, "qparam_lr": qparam_lr,
        "weight_scales_flipped_or_collapsed": sum(n in bad for n in w) / len(w),
        "act_scales_flipped_or_collapsed": sum(n in bad for n in a) / len(a),
        "min_s_over_s0": min_ratio,
        "median_weight_s0": statistics.median(float(s0[n].median()) for n in w),
        "collapsed_ops_at_end": len(collapsed_ops(model)),
        "final_train_loss": statistics.fmean(losses[-20:]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--fp-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--qparam-lr", type=float, default=1e-3)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_qat_scales.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = ImageData(synthetic=True, batch_size=64, train_subset=2048, test_subset=256)
    fp = fp_model(args.fp_steps, data)
    runs = [qat_run(fp, data, b, how, args.steps, args.lr, args.qparam_lr)
            for b in args.bits for how in ("adam_linear", "adam_log", "sgd_linear")]  # fmt: skip
    for r in runs:
        print(json.dumps(r))
    out = {"args": vars(args), "runs": runs, "provenance": provenance(torch.device("cpu")),
           "note": "tiny ViT, synthetic data, shared 2-core CPU"}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
