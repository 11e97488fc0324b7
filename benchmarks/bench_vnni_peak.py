"""The INT8 peak of this CPU's dot-product instruction, and the GEMMs hawq runs against it.

A register-blocked loop of independent ``vpdpbusd`` (AVX-512 VNNI, 64 u8 x s8 products
per instruction, 512-bit) or ``vpdpbusd``/``vpdpwssd`` 256-bit (AVX-VNNI) accumulations,
compiled at run time (``torch.utils.cpp_extension.load_inline``), run on every thread at
once: what the ISA delivers at most on this machine, measured, not taken from a data
sheet. Beside it, in the same run, the best INT8 GEMM hawq's ``cpu`` backend picks at the
seed ViT's batch-64 shapes (``torch._int_mm`` and oneDNN u8), as a fraction of that peak.

    python benchmarks/bench_vnni_peak.py [--threads 2] [--out benchmarks/results/vnni_peak.json]

Writes JSON with the CPU named (``lscpu`` model name, ISA flags, oneDNN's ISA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <chrono>

// ops/s of `iters` rounds of 12 independent 512-bit vpdpbusd per thread, all threads
double vnni512(int64_t iters, int64_t threads) {
  double seconds = 0.0;
  volatile int sink = 0;
  auto t0 = std::chrono::steady_clock::now();
  #pragma omp parallel num_threads(threads) reduction(+:sink)
  {
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0,
            c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    for (int64_t i = 0; i < iters; ++i) {
      c0 = _mm512_dpbusd_epi32(c0, a, b); c1 = _mm512_dpbusd_epi32(c1, a, b);
      c2 = _mm512_dpbusd_epi32(c2, a, b); c3 = _mm512_dpbusd_epi32(c3, a, b);
      c4 = _mm512_dpbusd_epi32(c4, a, b); c5 = _mm512_dpbusd_epi32(c5, a, b);
      c6 = _mm512_dpbusd_epi32(c6, a, b); c7 = _mm512_dpbusd_epi32(c7, a, b);
      c8 = _mm512_dpbusd_epi32(c8, a, b); c9 = _mm512_dpbusd_epi32(c9, a, b);
      c10 = _mm512_dpbusd_epi32(c10, a, b); c11 = _mm512_dpbusd_epi32(c11, a, b);
    }
    __m512i s = _mm512_add_epi32(c0, c1);
    s = _mm512_add_epi32(s, _mm512_add_epi32(c2, c3));
    s = _mm512_add_epi32(s, _mm512_add_epi32(c4, c5));
    s = _mm512_add_epi32(s, _mm512_add_epi32(c6, c7));
    s = _mm512_add_epi32(s, _mm512_add_epi32(c8, c9));
    s = _mm512_add_epi32(s, _mm512_add_epi32(c10, c11));
    sink += _mm512_reduce_add_epi32(s);
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // 12 instructions x 64 multiply-accumulates x 2 ops, per round and thread
  return 12.0 * 64.0 * 2.0 * (double)iters * (double)threads / seconds + 0.0 * sink;
}
"""


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split(":")[1].split())
    return sorted(have & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "avx2"})


def peak(threads: int) -> float:
    from torch.utils.cpp_extension import load_inline

    mod = load_inline("hawq_vnni_peak", cpp_sources=SRC, functions=["vnni512"],
                      extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
    mod.vnni512(10_000, threads)  # warm up, clocks up
    best = 0.0
    for _ in range(5):
        best = max(best, mod.vnni512(20_000_000, threads))
    return best


def median_s(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gemm_times(x: torch.Tensor, w: torch.Tensor, iters: int) -> dict[str, float]:
    from hawq.integer import cpu

    wt = w.t().contiguous()
    return {"int_mm": median_s(lambda: torch._int_mm(x, wt), iters),
            "onednn_u8": median_s(lambda: cpu.gemm_with("onednn_u8", x, w), iters),
            "chosen": median_s(lambda: cpu.gemm(x, w), iters)}  # fmt: skip


def gemms(iters: int) -> list[dict]:
    """The seed ViT's batch-64 GEMM shapes (M = 64 x 65 tokens) and the CPU ViT's."""
    from hawq.integer import cpu

    rows = []
    for m, k, n in [(4160, 128, 384), (4160, 128, 128), (4160, 128, 256), (4160, 256, 128),
                    (4160, 512, 1536), (4160, 512, 512)]:  # fmt: skip
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        t = gemm_times(x, w, iters)
        tops = {f"{key}_tops": 2 * m * k * n / s / 1e12 for key, s in t.items()}
        rows.append({"shape": [m, k, n], "chosen_kernel": cpu.gemm_choice(), **tops})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/vnni_peak.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if "avx512_vnni" not in flags():
        sys.exit("bench_vnni_peak: this CPU has no AVX-512 VNNI; nothing to measure here")
    p = peak(args.threads)
    rows = gemms(args.iters)
    for r in rows:
        best = max(r["int_mm_tops"], r["onednn_u8_tops"], r["chosen_tops"])
        r["best_vs_peak"], r["chosen_vs_peak"] = best / (p / 1e12), r["chosen_tops"] / (p / 1e12)
    res = {"cpu": cpu_name(), "flags": flags(), "threads": args.threads,
           "torch": torch.__version__, "peak_tops": p / 1e12, "gemm": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
