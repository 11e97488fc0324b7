"""Integer inference speed: INT8 GEMM + requant vs cuBLAS FP16 and ``torch._int_mm``; integer
ViT end to end vs pure FP16; a latency table (op x setting -> microseconds) for the allocator.

Usage::

    python benchmarks/bench_integer.py --out benchmarks/integer.json [--quick]

GPU parts need CUDA (and triton for the fused kernel); on a CPU they are skipped with a
message, and only the CPU reference path is timed (as a sanity number, not a target).
Issue 7's targets (H100): INT8 GEMM + requant >= 1.5x cuBLAS FP16 at M=66560, K=512,
N=512/1536/2048; integer ViT >= 1.5x pure-FP16 img/s at batch 1024.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hawq.integer import ops  # noqa: E402
from hawq.integer.dyadic import Requant  # noqa: E402
from hawq.integer.latency import median_seconds  # noqa: E402

GEMM_SHAPES = [(66560, 512, 512), (66560, 512, 1536), (66560, 512, 2048), (8192, 8192, 8192)]


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    return median_seconds(fn, iters, warmup, cuda=torch.cuda.is_available())


def gemm_gpu(m: int, k: int, n: int, iters: int) -> dict:
    dev = "cuda"
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)
    b = torch.randint(-1000, 1000, (n,), dtype=torch.int32, device=dev)
    rq = Requant.from_scale(torch.full((n,), 1e-4, dtype=torch.float64), 0).to(dev)
    xh, wh = x.half(), w.half()
    flops = 2 * m * n * k
    res = {"shape": [m, k, n]}
    res["fp16_s"] = timed(lambda: xh @ wh.t(), iters)
    res["int_mm_s"] = timed(lambda: torch._int_mm(x, w.t()), iters)
    with ops.backend("int_mm"):
        res["int_mm_requant_s"] = timed(lambda: ops.int_linear(x, w, b, rq), iters)
    if ops.triton_available():
        with ops.backend("triton"):
            res["triton_requant_s"] = timed(lambda: ops.int_linear(x, w, b, rq), iters)
            w4 = ops.pack_int4(torch.clamp(w, -8, 7))
            res["triton_int4_requant_s"] = timed(lambda: ops.int_linear(x, w4, b, rq), iters)
    for key in [k for k in res if k.endswith("_s")]:
        res[key.replace("_s", "_tops")] = flops / res[key] / 1e12
        res[key.replace("_s", "_vs_fp16")] = res["fp16_s"] / res[key]
    return res


def vit_e2e_gpu(batch: int, iters: int, compile_budget_s: float) -> dict:
    from hawq.integer.convert import convert
    from hawq.integer.regional import compile_blocks
    from hawq.models import ViT
    from hawq.quant import Plan, calibrate, quantize_

    torch.manual_seed(0)
    fp = ViT().cuda().eval()
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    half = ViT().cuda().eval().half()
    half.load_state_dict(fp.state_dict())
    with torch.no_grad():
        t_fp16 = timed(lambda: half(x.half()), iters)
        q = ViT().cuda().eval()
        q.load_state_dict(fp.state_dict())
        quantize_(q, Plan())
        calibrate(q, [(x[:256],)])
        im = convert(q, [(x[:256],)]).cuda()
        xq = im.quantize_input(x)
        t_int = timed(lambda: im.forward_int(xq), iters)
        eager = im.forward_int(xq)
        # block by block within a budget (hawq.integer.regional: a whole-graph compile of
        # the integer model can take many minutes); inductor fuses each block's integer
        # elementwise chains of GELU / softmax / LayerNorm / requant between the GEMM kernels
        comp = compile_blocks(im, xq, budget_s=compile_budget_s)
        t_int_c = timed(lambda: im.forward_int(xq), iters)
        exact = bool(torch.equal(im.forward_int(xq), eager))
    return {"batch": batch, "fp16_img_s": batch / t_fp16, "integer_img_s": batch / t_int,
            "integer_vs_fp16": t_fp16 / t_int, "integer_compiled_img_s": batch / t_int_c,
            "integer_compiled_vs_fp16": t_fp16 / t_int_c, "compiled_bit_exact": exact,
            "compile": comp, "backend": ops.get_backend()}  # fmt: skip


def attention_gpu(batch: int, iters: int) -> dict:
    """Seed-ViT attention matmuls (8 heads, 65 tokens, head dim 64): the Triton INT8 kernel
    vs fp16 ``torch.matmul``; ``q``, ``k``, ``v`` are strided slices of one qkv, as in the model.
    """
    h, t, d = 8, 65, 64
    qkv = torch.randint(-128, 128, (batch, t, 3, h, d), dtype=torch.int8, device="cuda")
    p = torch.randint(-128, 128, (batch, h, t, t), dtype=torch.int8, device="cuda")
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
    qh, kh, vh = qkv.half().permute(2, 0, 3, 1, 4)
    kt, kth = k.transpose(-2, -1), kh.transpose(-2, -1)
    return {"batch": batch, "heads": h,
            "qk_65x64x65": _attn_row(q, kt, qh, kth, 3, -7, iters),
            "av_65x65x64": _attn_row(p, v, p.half(), vh, -128, 0, iters)}  # fmt: skip


def _attn_row(a, b, ah, bh, za: int, zb: int, iters: int) -> dict[str, float]:
    rq = Requant.from_scale(1e-4, 0).to("cuda")
    row = {"fp16_s": timed(lambda: torch.matmul(ah, bh), iters)}
    with ops.backend("triton"):
        row["triton_int8_s"] = timed(lambda: ops.int_matmul(a, b, za, zb, rq), iters)
        row["triton_int32_s"] = timed(lambda: ops.int_matmul(a, b, za, zb), iters)  # no requant
    row["triton_int8_vs_fp16"] = row["fp16_s"] / row["triton_int8_s"]
    return row


def latency_table(batch: int, iters: int, out: Path) -> dict:
    """The seed ViT's latency table (``hawq.integer.latency``): every op shape x the default
    allocation candidates and FP, microseconds per image; also written to ``out`` for
    ``alloc.latency_table``."""
    from hawq.alloc.candidates import Candidate
    from hawq.integer.latency import measure_latency, write_latency_table
    from hawq.models import ViT

    cands = [Candidate(w, a) for w in (4, 8) for a in (4, 8)] + [Candidate(None, None)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    table = measure_latency(ViT().eval(), cands, batch=batch, iters=iters, device=dev)
    write_latency_table(table, out)
    return table


def fp8_gemm_gpu(m: int, k: int, n: int, iters: int) -> dict:
    """FP8 E4M3 ``torch._scaled_mm`` (tensorwise scales, bf16 out) and ``ops.fp8_linear`` (the
    fp8 path's GEMM: fp32 out, per-channel weight scale) vs cuBLAS FP16 at (M, K, N)."""
    x, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    xh, wh, one, s_w = x.half(), w.half(), torch.ones((), device="cuda"), torch.rand(n).cuda()
    res = {"shape": [m, k, n], "fp16_s": timed(lambda: xh @ wh.t(), iters)}
    mm = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,  # noqa: E731
                                  out_dtype=torch.bfloat16)  # fmt: skip
    res["scaled_mm_s"] = timed(mm, iters)
    with ops.backend("auto"):
        res["fp8_linear_s"] = timed(lambda: ops.fp8_linear(x8, w8, one, s_w), iters)
    for key in ("scaled_mm_s", "fp8_linear_s"):
        res[key.replace("_s", "_vs_fp16")] = res["fp16_s"] / res[key]
    return res


def cpu_reference(quick: bool) -> dict:
    m, k, n = (4096, 512, 512) if quick else (16384, 512, 512)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    rq = Requant.from_scale(torch.full((n,), 1e-4, dtype=torch.float64), 0)
    xf, wf = x.float(), w.float()
    t_ref = timed(lambda: ops.int_linear(x, w, None, rq), 3, 1)
    t_f32 = timed(lambda: xf @ wf.t(), 3, 1)
    return {"shape": [m, k, n], "reference_int_linear_s": t_ref, "fp32_matmul_s": t_f32,
            "reference_vs_fp32": t_f32 / t_ref}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "integer.json"),
                    help="JSON output (default: benchmarks/integer.json beside this script)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small CPU sizes")
    ap.add_argument("--compile-budget-s", type=float, default=180.0,
                    help="stop compiling integer-ViT blocks after this many seconds")
    ap.add_argument("--latency-out", default="benchmarks/latency_vit_cifar.json",
                    help="the seed ViT's latency table, for alloc.latency_table")
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__, "python": platform.python_version(),
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "triton": ops.triton_available()}  # fmt: skip
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, Callable[[], object]]] = [
        ("cpu_reference", lambda: cpu_reference(args.quick))]
    if not torch.cuda.is_available() and args.quick:  # a CPU table: format check, not a target
        sections.append(("latency_us", lambda: latency_table(8, 3, Path(args.latency_out))))
    if torch.cuda.is_available():
        sections += [
            ("gemm", lambda: [gemm_gpu(*s, args.iters) for s in GEMM_SHAPES]),
            ("vit_e2e", lambda: vit_e2e_gpu(1024, args.iters, args.compile_budget_s)),
            ("attention", lambda: attention_gpu(1024, args.iters) if ops.triton_available()
             else {}),
            ("fp8_gemm", lambda: [fp8_gemm_gpu(*s, args.iters) for s in GEMM_SHAPES[:3]]),
            ("latency_us", lambda: latency_table(1024, args.iters, Path(args.latency_out))),
        ]  # fmt: skip
    else:
        msg = "no CUDA GPU: GEMM / end-to-end / latency-table benchmarks skipped"
        print(msg, file=sys.stderr)
        out["skipped"] = msg
    for name, fn in sections:  # one failing section does not lose the others
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"bench_integer: {name} failed: {e}", file=sys.stderr)
        dest.write_text(json.dumps(out, indent=2) + "\n")  # after each section: a kill keeps it
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
