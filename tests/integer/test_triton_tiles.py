"""Triton kernels: every autotune tile config is bit-exact, and pointer offsets are int64.

Under the interpreter (CPU) each config of ``GEMM_CONFIGS`` / ``BMM_CONFIGS`` runs
explicitly (the autotuner itself needs CUDA timers); ``tile_offsets`` is checked against
Python integers with strides whose products pass ``2^31``; and the kernels are compiled for
sm_90 without a GPU (``compile_sm90.py``), checking that every 2-D pointer tile is offset by
i64 values. With CUDA, a GEMM and a batched matmul whose operands span more than ``2^31``
elements run end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hawq.integer import ops
from hawq.integer.dyadic import Requant

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from hawq.integer import triton_bmm, triton_gemm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HERE = Path(__file__).resolve().parent


def _gemm_case(m: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (k, m), generator=g, dtype=torch.int8).t()  # strided view
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    b = torch.randint(-(2**20), 2**20, (n,), generator=g, dtype=torch.int32)
    rq = Requant.from_scale(torch.rand(n, generator=g, dtype=torch.float64) * 1e-3,
                            torch.randint(-20, 20, (n,), generator=g), -128, 127)  # fmt: skip
    return x, w, b, rq


@pytest.mark.parametrize("cfg", triton_gemm.GEMM_CONFIGS, ids=str)
def test_every_gemm_config_bit_exact(cfg):
    """Odd M, N and a K that is no multiple of BK: every tile config masks its tails."""
    x, w, b, rq = _gemm_case(m=70, k=100, n=40, seed=sum(cfg))
    ref = ops.int_linear(x.contiguous(), w, b, rq)
    kw = triton_gemm.launch_kwargs(cfg, ("BM", "BN", "BK", "GROUP_M"))
    dev = lambda t: t.to(DEV)  # noqa: E731
    got = triton_gemm.gemm_requant(dev(x), dev(w), dev(b), rq, config=kw)
    assert torch.equal(got.cpu(), ref)
    got4 = triton_gemm.gemm_requant(dev(x), dev(ops.pack_int4(w)), dev(b), rq, k=100, config=kw)
    assert torch.equal(got4.cpu(), ref)


@pytest.mark.parametrize("cfg", triton_bmm.BMM_CONFIGS, ids=str)
def test_every_bmm_config_bit_exact(cfg):
    """Seed-ViT attention shapes (65 tokens) with zero points, per-column requant."""
    g = torch.Generator().manual_seed(sum(cfg))
    q = torch.randint(-128, 128, (2, 2, 65, 64), generator=g, dtype=torch.int8)
    kt = torch.randint(-128, 128, (2, 2, 65, 64), generator=g, dtype=torch.int8).transpose(-2, -1)
    rq = Requant.from_scale(torch.rand(65, generator=g, dtype=torch.float64) * 1e-3, 3, -128, 127)
    kw = triton_gemm.launch_kwargs(cfg, ("BM", "BN", "BK"))
    for za, zb, r in [(3, -7, rq), (-128, 0, None)]:
        ref = ops.int_matmul(q, kt, za, zb, r)
        got = triton_bmm.bmm_requant(q.to(DEV), kt.to(DEV), za, zb, r, config=kw)
        assert torch.equal(got.cpu(), ref)


@triton.jit
def _offsets_kernel(out_ptr, s0, s1, R0: tl.constexpr, R1: tl.constexpr):
    r0 = tl.arange(0, R0) * 3 + 1  # int32 row indices
    r1 = tl.arange(0, R1)
    off = triton_gemm.tile_offsets(r0, r1, s0, s1)
    tl.store(out_ptr + tl.arange(0, R0)[:, None] * R1 + tl.arange(0, R1)[None, :], off)


@pytest.mark.parametrize("s0,s1", [(2**30 + 7, 1), (1_000_003, 2**30 + 1), (5, 3)])
def test_tile_offsets_exact_past_int32(s0, s1):
    """Offsets are exact int64 where ``r * s`` in int32 would wrap (rows up to 46 x 2^30)."""
    out = torch.zeros(16, 4, dtype=torch.int64, device=DEV)
    _offsets_kernel[(1,)](out, s0, s1, R0=16, R1=4)
    r0 = torch.arange(16, dtype=torch.int64) * 3 + 1
    expect = r0[:, None] * s0 + torch.arange(4, dtype=torch.int64)[None, :] * s1
    assert expect.max() > 2**31 or s0 == 5
    assert torch.equal(out.cpu(), expect)


ALL = "gemm_int8,gemm_int8_strided,gemm_int4,bmm_zp"


def _compile_sm90(cases: str, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(HERE / "compile_sm90.py"), "--cases", cases, *extra],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_kernels_compile_for_sm90_with_int64_offsets():
    """The whole Triton pipeline down to an sm_90 cubin, on the CPU (small tiles: the same
    code, seconds to compile): GPU-only compile errors (a stride specialized to constexpr 1, an
    int4 unpack layout) show before any GPU is lent; every load/store tile offset is i64."""
    out = _compile_sm90(ALL, "--small")
    for name in ALL.split(","):
        assert out[name]["cubin_bytes"] > 0
        assert out[name]["offsets"] and set(out[name]["offsets"]) == {"i64"}, out[name]


@pytest.mark.slow
def test_kernels_compile_for_sm90_at_autotune_tiles():
    """The first autotune config of each kernel (128x128x64, 3 stages: ~5 s per kernel)."""
    out = _compile_sm90(ALL)
    for name in ALL.split(","):
        assert out[name]["cubin_bytes"] > 0 and set(out[name]["offsets"]) == {"i64"}, out[name]


@pytest.mark.gpu
def test_gemm_past_2_31_elements_on_cuda():
    """x spans 2^31 + 2^21 bytes (row stride 2^21): the last rows sit past the int32 range."""
    k, rows, stride = 512, 1025, 2**21
    store = torch.zeros(stride * rows, dtype=torch.int8, device="cuda")
    x = store.as_strided((rows, k), (stride, 1))
    x.copy_(torch.randint(-128, 128, (rows, k), dtype=torch.int8, device="cuda"))
    w = torch.randint(-128, 128, (64, k), dtype=torch.int8, device="cuda")
    rq = Requant.from_scale(1e-4, 0).to("cuda")
    with ops.backend("reference"):
        ref = ops.int_linear(x.contiguous(), w, None, rq)
    assert torch.equal(triton_gemm.gemm_requant(x, w, None, rq), ref)


@pytest.mark.gpu
def test_bmm_past_2_31_elements_on_cuda():
    """a's row stride is 2^25: rows 64.. of the 65-token tile start past 2^31."""
    m, k, stride = 65, 64, 2**25
    store = torch.zeros(stride * m, dtype=torch.int8, device="cuda")
    a = store.as_strided((1, m, k), (stride * m, stride, 1))
    a.copy_(torch.randint(-128, 128, (1, m, k), dtype=torch.int8, device="cuda"))
    b = torch.randint(-128, 128, (1, k, m), dtype=torch.int8, device="cuda")
    with ops.backend("reference"):
        ref = ops.int_matmul(a.contiguous(), b, 3, -7)
    assert torch.equal(triton_bmm.bmm_requant(a, b, 3, -7), ref)
