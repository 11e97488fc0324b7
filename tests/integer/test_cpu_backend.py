"""The ``cpu`` backend (oneDNN GEMMs + C++ epilogues) equals the ``reference`` backend's
codes bit for bit: >= 10,000 seeded random cases of every kernel (odd shapes, K = 1, K past
the oneDNN bound, extreme scales, int32 accumulators near 2^31, per-channel fields, zero
points, int4 weights, GELU tables, residual adds), then whole models."""

from __future__ import annotations

import math

import pytest
import torch

from hawq.integer import cpu, isa, ops
from hawq.integer.dyadic import INT32_MAX, Requant
from hawq.integer.layernorm import IntLayerNorm
from hawq.integer.softmax import IntSoftmax

pytestmark = pytest.mark.skipif(not cpu.available(), reason="cpu backend did not build")

N_LINEAR, N_MATMUL, N_CONV, N_SOFTMAX, N_LN, N_ATTN = 5000, 1500, 500, 2000, 1000, 400
PER_WEIGHT = 10  # linear cases sharing one weight (prepacking is what costs time)


def _both(fn, *args, **kw):
    """``fn(*args, **kw)`` on the reference and the cpu backend."""
    with ops.backend("reference"):
        ref = fn(*args, **kw)
    with ops.backend("cpu"):
        got = fn(*args, **kw)
    return ref, got


def _scale(g: torch.Generator, n: int) -> torch.Tensor:
    """Multipliers from 2^-45 to 2^29 (log-uniform): shifts up to 62, tiny and huge."""
    return torch.pow(2.0, torch.rand(n, generator=g, dtype=torch.float64) * 74 - 45)


def _requant(g: torch.Generator, n: int, per_channel: bool, wide: bool) -> Requant:
    k = n if per_channel else 1
    s = _scale(g, k)
    z = torch.randint(-20, 20, (k,), generator=g)
    if wide:
        lo, hi, dt = -(2**30), 2**30, torch.int32
    else:
        lo, hi, dt = -128, int(torch.randint(-100, 128, (), generator=g)), torch.int8
    if not per_channel:
        s, z = s[0], z[0]
    return Requant.from_scale(s, z, lo, hi, dt)


def _weight(g: torch.Generator, j: int) -> tuple[torch.Tensor, bool]:
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    k = 1 if j % 10 == 0 else (r(1025, 1100) if j % 97 == 0 else r(1, 200))
    int4 = j % 5 == 1
    lim = 8 if int4 else 128
    w = torch.randint(-lim, lim, (r(1, 40), k), generator=g, dtype=torch.int8)
    if j % 7 == 0:
        w.fill_(-lim)  # the largest products (with x = -128)
    return w, int4


def _one_linear(g: torch.Generator, i: int, w: torch.Tensor, wt: torch.Tensor):
    """One case: ``w`` the int8 weight, ``wt`` what the kernel gets (maybe packed int4)."""
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    n, k = w.shape
    m = (1, 3, 17, 40)[r(0, 3)]  # few distinct M: oneDNN builds a primitive per shape
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    if i % 7 == 0:
        x.fill_(-128)
    room = INT32_MAX - k * 2**14
    if i % 3 == 0:  # accumulators near 2^31
        b = torch.randint(room - 1000, room + 1, (n,), generator=g, dtype=torch.int64)
        b = b * torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)
        b = b.to(torch.int32)
    else:
        b = torch.randint(-(2**20), 2**20, (n,), generator=g, dtype=torch.int32)
    wide = i % 4 == 0
    rq = _requant(g, n, per_channel=i % 2 == 0, wide=wide)
    lut = res = None
    if i % 11 == 0 and not wide and rq.lo.dim() == 0:  # a table over [lo, hi]
        span = int(rq.hi) - int(rq.lo) + 1
        lut = torch.randint(-128, 128, (span,), generator=g, dtype=torch.int8)
    if i % 13 == 0:
        res = torch.randint(-(2**15), 2**15, (m, n), generator=g, dtype=torch.int32)
    return _both(ops.int_linear, x, wt, b, rq, k=k, lut=lut, residual=res, limit=2**15 - 1)


def test_int_linear_cpu_equals_reference():
    g = torch.Generator().manual_seed(0)
    for j in range(N_LINEAR // PER_WEIGHT):
        w, int4 = _weight(g, j)
        wt = ops.pack_int4(w) if int4 else w
        for i in range(j * PER_WEIGHT, (j + 1) * PER_WEIGHT):
            ref, got = _one_linear(g, i, w, wt)
            assert got.dtype == ref.dtype and torch.equal(got, ref), f"case {i}"


@pytest.mark.parametrize("kernel", cpu.gemm_candidates())
def test_every_gemm_kernel_equals_reference(kernel, monkeypatch):
    """Each kernel ``gemm_choice`` may pick, forced: 1,000 of the cases above (whichever is
    measured fastest on a machine, the others are never run by the test above), and the
    largest accumulators (K = 1024, all -128: 2^24) at M above and below int_mm's bound."""
    monkeypatch.setitem(cpu._gemm_choice, "choice", kernel)
    monkeypatch.setitem(cpu._gemm_choice, "seconds", {})
    g = torch.Generator().manual_seed(7)
    for j in range(100):
        w, int4 = _weight(g, j)
        wt = ops.pack_int4(w) if int4 else w
        for i in range(j * PER_WEIGHT, (j + 1) * PER_WEIGHT):
            ref, got = _one_linear(g, i, w, wt)
            assert got.dtype == ref.dtype and torch.equal(got, ref), f"{kernel} case {i}"
    for m in (1, 16, 24, 64):
        x = torch.full((m, 1024), -128, dtype=torch.int8)
        w = torch.full((32, 1024), -128, dtype=torch.int8)
        acc = cpu.gemm_with(kernel, x, w)
        assert torch.equal(acc.to(torch.int64), torch.full((m, 32), 2**24)), (kernel, m)


def test_int_matmul_cpu_equals_reference():
    g = torch.Generator().manual_seed(1)
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for i in range(N_MATMUL):
        bsz, m, k, n = r(1, 3), r(1, 20), (1 if i % 10 == 0 else r(1, 258)), r(1, 20)
        a = torch.randint(-128, 128, (bsz, 2, m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (bsz, 2, k, n), generator=g, dtype=torch.int8)
        za, zb = r(-128, 127), r(-128, 127)
        rq = _requant(g, 1, per_channel=False, wide=False) if i % 2 else None
        ref, got = _both(ops.int_matmul, a, b, za, zb, rq)
        assert torch.equal(got, ref.to(got.dtype)) and got.dtype == ref.dtype, f"case {i}"


def test_int_conv2d_cpu_equals_reference():
    g = torch.Generator().manual_seed(2)
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for i in range(N_CONV):
        c, n, ks = r(1, 12), r(1, 12), r(1, 3)
        h = r(ks, 9)
        x = torch.randint(-128, 128, (r(1, 3), c, h, h), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, c, ks, ks), generator=g, dtype=torch.int8)
        b = torch.randint(-(2**20), 2**20, (n,), generator=g, dtype=torch.int32)
        rq = _requant(g, n, per_channel=i % 2 == 0, wide=i % 3 == 0)
        stride, pad, zp = r(1, 2), r(0, 1), r(-128, 127)
        ref, got = _both(ops.int_conv2d, x, w, b, rq, stride, pad, zp)
        assert torch.equal(got, ref), f"case {i}"


def test_softmax_cpu_equals_reference():
    g = torch.Generator().manual_seed(3)
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for i in range(N_SOFTMAX):
        scale = math.exp(float(torch.empty(()).uniform_(math.log(1e-9), math.log(10.0),
                                                        generator=g)))  # fmt: skip
        sm = IntSoftmax(scale, out_bits=r(8, 30))  # > 22: the int64 division path
        span = min(2**31 - 1, max(2, int(30 / scale)))
        q = torch.randint(-span, span, (r(1, 4), r(1, 70)), generator=g, dtype=torch.int64)
        q = q.to(torch.int32)
        rq = Requant.from_scale(2.0 ** -sm.out_bits * 255, -128, -128, 127) if i % 2 else None
        ref, got = _both(sm, q, rq)
        assert torch.equal(got, ref), f"case {i}"


def test_layernorm_cpu_equals_reference():
    g = torch.Generator().manual_seed(4)
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for i in range(N_LN):
        d, bits = r(1, 80), r(4, 17)
        wt = torch.randn(d, generator=g, dtype=torch.float64) * 2
        bs = torch.randn(d, generator=g, dtype=torch.float64)
        s_in = float(torch.rand((), generator=g)) + 1e-3
        wide = i % 3 == 0
        lo, hi = (-(2**20), 2**20) if wide else (-128, 127)
        ln = IntLayerNorm(wt, bs, 1e-5 if i % 4 else 0.0, s_in, bits, 0.02, r(-10, 10), lo, hi)
        lim = 2 ** (bits - 1)
        q = torch.randint(-lim, lim, (r(1, 5), d), generator=g, dtype=torch.int32)
        if i % 9 == 0:
            q[0] = q[0, 0]  # a constant row
        ref, got = _both(ln, q)
        assert torch.equal(got, ref), f"case {i}"


def _attention_case(g: torch.Generator, i: int):
    """One ``int_attention`` case: odd T and head dims, zero points up to the int8 ends."""
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    heads = r(1, 3)
    hd = (1, 3, 4, 5, 16, 17, 33, 64)[i % 8]
    b, t, k = r(1, 3), (1, 2, 3, 4, 15, 16, 17, 65)[(i // 8) % 8], r(1, 48)
    n = 3 * heads * hd
    h = torch.randint(-128, 128, (b, t, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-(2**16), 2**16, (n,), generator=g, dtype=torch.int32)
    zs = [r(-128, 127) if i % 5 else (-128, 127)[i % 2] for _ in range(4)]  # zq, zk, zv, zp
    zcol = torch.tensor([zs[0]] * (n // 3) + [zs[1]] * (n // 3) + [zs[2]] * (n // 3))
    s_qkv = torch.full((n,), 2.0 ** -float(r(6, 12)), dtype=torch.float64)
    qkv_rq = Requant.from_scale(s_qkv * torch.rand(n, generator=g, dtype=torch.float64), zcol,
                                -128, 127, torch.int8)  # fmt: skip
    sm = IntSoftmax(2.0 ** -float(r(2, 12)) * float(torch.rand((), generator=g)) + 1e-6)
    p_rq = Requant.from_scale(2.0**-sm.out_bits * 255, zs[3], -128, 127)
    s_out = 2.0 ** -float(r(6, 16))
    if i % 10 == 9:  # per-channel output requant: the float32 fallback of the cpu backend
        out_rq = Requant.from_scale(torch.full((hd,), s_out, dtype=torch.float64), r(-5, 5),
                                    -128, 127)  # fmt: skip
    else:
        out_rq = Requant.from_scale(s_out, r(-5, 5), -128, 127)
    return _both(ops.int_attention, h, w, bias, qkv_rq, heads, *zs, sm, p_rq, out_rq)


def test_int_attention_cpu_equals_reference():
    g = torch.Generator().manual_seed(5)
    for i in range(N_ATTN):
        ref, got = _attention_case(g, i)
        assert got.dtype == ref.dtype == torch.int8 and torch.equal(got, ref), f"case {i}"


def test_int_attention_cpu_runs_the_fused_kernel():
    """On a CPU with AVX-512 VNNI the fused kernel is what runs (a fallback would still pass
    the equality test above, silently slow)."""
    import re

    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if not re.search(r"\bavx512_vnni\b", flags):
        pytest.skip("no AVX-512 VNNI")
    assert hasattr(cpu.ext(), "attention_int8")


def test_property_case_count():
    assert N_LINEAR + N_MATMUL + N_CONV + N_SOFTMAX + N_LN + N_ATTN >= 10_000


def test_gemm_choice_is_the_measured_fastest_candidate():
    choice = cpu.gemm_choice()
    seconds = cpu._gemm_choice["seconds"]
    assert set(seconds) == set(cpu.gemm_candidates())
    assert choice == min(seconds, key=seconds.__getitem__)
    report = ops.kernel_report()
    assert report["isa"]["family_used"] in (*isa.ONEDNN_CAPS, "none")
    if report["resolved"] == "cpu":
        assert report["gemm"] == choice


def test_auto_on_cpu_is_the_measured_faster_backend():
    choice = ops.cpu_choice()
    t = ops._cpu_choice
    names = [n for n in ("reference", "int_mm", "cpu") if n in t]
    assert {"reference", "int_mm", "cpu"} == set(names)  # the extension built here
    assert choice == min(names, key=lambda n: t[n]) and t["cpu"] > 0
    with ops.backend("auto"):
        assert ops.resolve(torch.zeros(1, dtype=torch.int8)) == choice


def test_without_the_extension_auto_measures_int_mm_and_whole_models_stay_exact(tmp_path):
    """No compiler (``HAWQ_NO_CPU_EXT=1``): ``auto`` still picks by measurement among the
    backends that need none, and the integer ViT and ResNet on ``int_mm`` give the
    reference's outputs bit for bit."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch; from hawq.integer import ops, cpu; "
            "print(json.dumps([cpu.available(), ops.cpu_choice(), ops._cpu_choice]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HAWQ_NO_CPU_EXT": "1"}, timeout=120)  # fmt: skip
    available, choice, t = json.loads(out.stdout.strip().splitlines()[-1])
    assert not available and set(t) == {"reference", "int_mm", "choice"}
    assert choice == min(("reference", "int_mm"), key=lambda n: t[n])
    from hawq.integer.convert import convert
    from hawq.models import ResNet, ViT
    from hawq.quant import Plan, calibrate, quantize_

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for model in (ViT(image_size=32, patch_size=8, dim=64, depth=2, heads=2, mlp_dim=96,
                      dropout=0.0), ResNet(depth=8, width=8)):  # fmt: skip
        quantize_(model.eval(), Plan.from_dict({"_default": {"w_bits": 8, "a_bits": 8}}), None,
                  True)  # fmt: skip
        calibrate(model, [(x,)])
        im = convert(model.eval(), [(x,)])
        with torch.no_grad():
            ref, got = _both(im, x)
            with ops.backend("int_mm"):
                got = im(x)
        assert torch.equal(got, ref)
