"""Integer-only speed of the graph converter's models vs the hand-written classes they
replaced (issue 30; target >= 0.9x), on the ``cpu`` backend, calls interleaved.

Usage::

    python benchmarks/bench_graph_vs_handwritten.py [--threads 2] [--iters 15]
        [--out benchmarks/results/graph_vs_handwritten.json]

The seed ViT (``ViT(dim=512, depth=6, heads=8, mlp_dim=512)``) and ResNet-20 at batch 64
(and 1), W8A8 PTQ on random images (speed does not depend on the values). Both integer
models of one network are checked bit-identical first, then called in turn ``iters`` times
(a change of machine load hits both alike); the figure is the ratio of medians. The
hand-written classes live in ``tests/integer`` (the converter's oracle), so this runs from a
checkout. Also in ``bench_integer_cpu.py`` (``*_graph_vs_handwritten``) beside the peers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_integer_cpu import build, fake_quant, interleaved  # noqa: E402
from hawq.integer import cpu, isa, ops  # noqa: E402
from hawq.integer.convert import convert  # noqa: E402
from tests.integer.cases import handwritten  # noqa: E402


def bench(kind: str, batches: list[int], iters: int) -> dict:
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q8 = fake_quant(build(kind), calib, 8)
    graph, hand = convert(q8, [(calib,)]), handwritten(q8, [(calib,)])
    out: dict = {"steps": len(list(graph.steps.children()))}
    for b in batches:
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode(), ops.backend("cpu"):
            same = torch.equal(graph.forward_int(graph.quantize_input(x)),
                               hand.forward_int(hand.quantize_input(x)))  # fmt: skip
            g, h = interleaved([lambda x=x: graph(x), lambda x=x: hand(x)], iters)
        out[f"batch{b}"] = {"bit_identical": same, "graph_ms": 1e3 * g, "handwritten_ms": 1e3 * h,
                            "graph_speed_vs_handwritten": h / g}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/graph_vs_handwritten.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu.keep_freed_memory()
    res = {"machine": isa.model_name(), "isa": isa.describe()["family_used"],
           "threads": args.threads, "torch": torch.__version__,
           "load_avg_1min": os.getloadavg()[0],
           "gemm": ops.kernel_report().get("gemm")}  # fmt: skip
    res["vit"] = bench("vit", [64, 1], args.iters)
    res["resnet20"] = bench("resnet", [64, 1], args.iters)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
