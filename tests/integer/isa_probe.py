"""Run every GEMM/conv shape class of the seed ViT and ResNet-20 on the ``cpu`` backend and
print one JSON line: the GEMM kernel chosen, its timings, and seconds per call of the
``cpu`` and ``reference`` backends on one GEMM. Run by ``test_isa_kernels.py`` in a fresh
process per ``ONEDNN_MAX_CPU_ISA`` cap, with ``ONEDNN_VERBOSE=1``, so oneDNN prints which
implementation each primitive runs.

Shape classes: a one-block ViT at the seed's widths (dim 512, 8 heads, MLP 512: qkv, proj,
fc1, fc2, the 4x4 patch conv, the 10-way head, the attention products) and ResNet-8 at
ResNet-20's widths (3x3 convs at 16/32/64 channels, the stride-2 and 1x1 shortcuts, fc).
"""

import json
import time

import torch

from hawq.integer import cpu, isa, ops
from hawq.integer.convert import convert
from hawq.integer.dyadic import Requant
from hawq.models import ResNet, ViT
from hawq.quant import Plan, calibrate, quantize_


def integer_model(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    quantize_(model.eval(), Plan.from_dict({"_default": {"w_bits": 8, "a_bits": 8}}), None, True)
    calibrate(model, [(images,)])
    return convert(model.eval(), [(images,)])


def per_call(fn, n: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    vit = ViT(dim=512, depth=1, heads=8, mlp_dim=512, dropout=0.0)
    resnet = ResNet(depth=8)
    with ops.backend("cpu"), torch.no_grad():
        for model in (vit, resnet):
            integer_model(model, images)(images[:2])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (520, 256), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (256, 256), generator=g, dtype=torch.int8)
    rq = Requant.from_scale(torch.full((256,), 1e-3, dtype=torch.float64))
    speed = {}
    for name in ("cpu", "reference"):
        with ops.backend(name):
            speed[name] = per_call(lambda: ops.int_linear(x, w, None, rq))
    print(json.dumps({"isa": isa.describe(), "gemm": cpu._gemm_choice["choice"],
                      "gemm_seconds": cpu._gemm_choice["seconds"], "backend_seconds": speed}))


if __name__ == "__main__":
    main()
