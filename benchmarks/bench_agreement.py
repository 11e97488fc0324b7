"""How far can integer-vs-fake-quant argmax agreement go? The fake-quant model's own noise floor.

The integer model is exact integer arithmetic; the fake-quant model it is compared with runs in
float32, whose rounding moves activations across quantization-grid boundaries (one code flips,
and the flip propagates). This script measures, on real CIFAR-10 test images:

* ``fq32_vs_fq64``: the same fake-quant model evaluated in float32 and in float64 -- the
  reference's own disagreement, a ceiling for any other implementation of it;
* ``int_vs_fq32`` / ``int_vs_fq64``: the integer model (``cpu`` backend) against both;
* the median top-2 logit margin of the images that disagree, next to the overall median.

Usage::

    python benchmarks/bench_agreement.py --checkpoint <run>/ptq_model.pt --data <cifar10 dir>
        [--n 10000] [--residual-bits 16] [--out benchmarks/results/agreement.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hawq.data.module import ImageData  # noqa: E402
from hawq.integer import ops  # noqa: E402
from hawq.integer.convert import convert  # noqa: E402
from hawq.quant import load_quantized  # noqa: E402


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float((a.argmax(1) == b.argmax(1)).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a quantized checkpoint (ptq_model.pt)")
    ap.add_argument("--data", required=True, help="CIFAR-10 folder")
    ap.add_argument("--n", type=int, default=10000, help="test images")
    ap.add_argument("--residual-bits", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = ImageData(root=args.data, batch_size=128, eval_batch_size=500, test_subset=args.n)
    q, _plan, _meta = load_quantized(args.checkpoint, "cpu")
    q.eval()
    q64 = copy.deepcopy(q).double()
    im = convert(q, data.eval_loader("train", batch_size=256), args.residual_bits, True, 4, 1.25)
    fq32, fq64, il, ys = [], [], [], []
    with torch.no_grad(), ops.backend("auto"):
        for x, y in data.eval_loader("test"):
            fq32.append(q(x))
            fq64.append(q64(x.double()))
            il.append(im(x).double())
            ys.append(y)
    f32, f64, ii, y = (torch.cat(t) for t in (fq32, fq64, il, ys))
    top2 = f64.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    dis = ii.argmax(1) != f32.argmax(1)
    res = {
        "checkpoint": args.checkpoint, "n": len(y), "residual_bits": args.residual_bits,
        "backend": ops.resolve(torch.zeros(1, dtype=torch.int8)),
        "acc": {"fq32": 100 * float((f32.argmax(1) == y).double().mean()),
                "fq64": 100 * float((f64.argmax(1) == y).double().mean()),
                "integer": 100 * float((ii.argmax(1) == y).double().mean())},
        "fq32_vs_fq64": agreement(f32, f64),
        "int_vs_fq32": agreement(ii, f32),
        "int_vs_fq64": agreement(ii, f64),
        "max_abs_logit_diff": {"fq32_fq64": float((f32.double() - f64).abs().max()),
                               "int_fq64": float((ii - f64).abs().max())},
        "median_margin": {"all": float(margin.median()),
                          "int_fq32_disagreeing": (float(margin[dis].median()) if dis.any()
                                                   else None)},
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
