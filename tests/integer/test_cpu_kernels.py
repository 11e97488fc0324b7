"""The C++ kernels of the ``cpu`` backend called directly, against int64 torch formulas, on
inputs chosen to hit the corners of their fast paths (issue 28): rounding ties, shifts 0 and
62, accumulators at the int32 limits, float accumulators beyond 2^31, residual adds that
overflow int32, the bounds that decide between the int32 path and the int64 one, tails of
every length; attention and LayerNorm rows at extreme scales. Bit for bit."""

from __future__ import annotations

import pytest
import torch

from hawq.integer import cpu
from hawq.integer.dyadic import rshift_round

pytestmark = pytest.mark.skipif(not cpu.available(), reason="cpu backend did not build")

I32 = 2**31


def _requant_ref(acc, bias, m, e, z, lo, hi, lut, res, rlo, rhi, dtype):
    """The kernel's semantics in int64 torch ops (residual add in int64, then the clamp)."""
    v = acc.to(torch.float64).to(torch.int64) if acc.is_floating_point() else acc.to(torch.int64)
    if bias is not None:
        v = v + bias.to(torch.int64)
    q = torch.clamp(rshift_round(v * m, e) + z, lo, hi)
    if lut is not None:
        q = lut.to(torch.int64)[q - lo]
    if res is not None:
        q = torch.clamp(q + res.to(torch.int64), rlo, rhi)
    return q.to(dtype)


def _fields(g, n, kind):
    r = lambda a, b, size=(n,): torch.randint(a, b, size, generator=g)  # noqa: E731
    if kind == "ties":  # m a power of two: (acc m) / 2^e hits x.5 often
        m = 2 ** r(0, 31)
        e = r(0, 40)
    elif kind == "wide":  # mantissas of dyadic(), every shift
        m = r(2**30, 2**31) * torch.where(r(0, 2) == 0, -1, 1)
        e = r(0, 63)
    else:  # the ViT / ResNet range: 31-bit mantissas, shifts 30..45
        m = r(2**30, 2**31)
        e = r(30, 46)
    z = r(-20, 20)
    lo = r(-128, 0)
    hi = r(0, 128)
    return m, e, z, lo, hi


@pytest.mark.parametrize("kind", ["ties", "wide", "model"])
def test_requant_kernel_equals_int64_formula(kind):
    g = torch.Generator().manual_seed({"ties": 1, "wide": 2, "model": 3}[kind])
    ext = cpu.ext()
    for case in range(400):
        r = lambda a, b, size=(): torch.randint(a, b, size, generator=g)  # noqa: E731
        n = int(r(1, 70)) if case % 3 else int(r(1, 5)) * 16
        rows = int(r(1, 20))
        m, e, z, lo, hi = _fields(g, n, kind)
        if case % 5 == 0:  # per-tensor fields, as Requant.channels expands them
            m, e, z, lo, hi = (t[:1].expand(n).contiguous() for t in (m, e, z, lo, hi))
        wide = case % 4 == 0
        if wide:
            lo, hi = torch.full((n,), -(2**30)), torch.full((n,), 2**30)
        if kind == "ties":
            acc = r(-64, 64, (rows, n)).to(torch.int32)
        else:
            acc = r(-I32, I32, (rows, n)).to(torch.int32)
            acc[0, : n // 2] = torch.where(torch.arange(n // 2) % 2 == 0, -I32, I32 - 1).to(
                torch.int32
            )
        bias = None
        if case % 2:
            lim = I32 if case % 7 == 1 else 2**20  # near the int32 limit: the int64 path
            bias = r(-lim, lim, (n,)).to(torch.int32)
        if case % 6 == 3:  # float accumulators, some beyond 2^31 (vcvttps2dq's INT32_MIN)
            acc = acc.to(torch.float32) * (r(1, 3) if case % 12 == 3 else 1)
        lut = res = None
        rlo = rhi = 0
        dtype = torch.int32 if wide else torch.int8
        if case % 4 == 1 and not wide:
            lo, hi = lo[:1].expand(n).contiguous(), hi[:1].expand(n).contiguous()
            lut = r(-128, 128, (int(hi[0] - lo[0]) + 1,)).to(torch.int32)
        if case % 4 == 0:
            dtype = torch.int32
            rlo, rhi = (-(2**31) + 1, 2**31 - 1) if case % 8 == 0 else (-32767, 32767)
            res = r(-I32, I32, (rows, n)).to(torch.int32)  # sums beyond int32 included
            if case % 8 == 4:
                res = r(-32767, 32768, (rows, n)).to(torch.int32)
        args = (acc, bias, m, e, z, lo, hi, lut, res, rlo, rhi, dtype, [])
        want = _requant_ref(*args[:-1])
        got = ext.requant(*args)
        assert got.dtype == want.dtype and torch.equal(got, want), (kind, case)


def _attention_ref(qkv, zq, zk, zv, zp, sm, p_rq, o_rq):
    """The fused kernel's semantics as int64 torch ops: qkv (B, T, 3, H, hd) int8 codes."""
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3).to(torch.int64) for i in range(3))  # (B, H, T, hd)
    s = (q - zq) @ (k - zk).transpose(-2, -1)
    p = p_rq(sm.reference(s)).to(torch.int64)
    o = o_rq((p - zp) @ (v - zv))
    b, h, t, hd = o.shape
    return o.permute(0, 2, 1, 3).reshape(b, t, h * hd)


def _rq(scale, z):
    from hawq.integer.dyadic import Requant

    return Requant.from_scale(scale, z, -128, 127, torch.int8)


@pytest.mark.skipif(not hasattr(cpu.ext(), "attention_int8"), reason="no AVX-512 VNNI")
def test_attention_kernel_equals_int64_composition():
    """Both softmax paths of the fused kernel (int32 lanes, and the int64 row where their
    bounds fail), shifts from -40 to +20, 8..30 output bits, requants whose products do not
    fit the int32 path, head dims with and without the 64-byte transpose, odd T."""
    from hawq.integer.softmax import IntSoftmax

    g = torch.Generator().manual_seed(7)
    ext = cpu.ext()
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for case in range(160):
        hd = (64, 128, 5, 17, 64, 3, 32, 64)[case % 8]
        t = (1, 2, 3, 17, 65, 16, 33, 4)[(case // 8) % 8]
        b, h = r(1, 2), r(1, 3)
        qkv = torch.randint(-128, 128, (b, t, 3, h, hd), generator=g, dtype=torch.int8)
        if case % 11 == 0:
            qkv.fill_(-128)  # the largest scores
        zq, zk, zv, zp = (r(-128, 127) for _ in range(4))
        scale = 10.0 ** (r(-170, 10) / 10)  # shifts far right (< -32) to left
        bits = (16, 8, 22, 23, 30, 16)[case % 6]
        sm = IntSoftmax(scale, out_bits=bits)
        p_scale = 2.0**-bits * 255 * (4.0 if case % 7 == 3 else 1.0)
        if case % 13 == 5:
            p_scale = 3.0  # a product beyond the int32 path: the int64 one
        p_rq = _rq(p_scale, zp)
        o_rq = _rq(2.0 ** -r(4, 16) if case % 9 else 2.0, r(-5, 5))
        got = ext.attention_int8(
            qkv,
            zq,
            zk,
            zv,
            zp,
            sm.shift,
            sm.q_ln2_int,
            sm.exp_table.to(torch.int32),
            sm.out_bits,
            cpu.scalar_fields(p_rq),
            cpu.scalar_fields(o_rq),
        )
        want = _attention_ref(qkv, zq, zk, zv, zp, sm, p_rq, o_rq)
        assert torch.equal(got, want), (case, sm.shift, bits, p_scale)


def test_layernorm_kernel_corners():
    """LayerNorm rows through the float64 output path and around it: constant rows, rows
    at the int32 ends, 1..4 input bits wider than the module allows for (the int64 path),
    widths of 1..70 (tails), eps 0."""
    from hawq.integer.layernorm import IntLayerNorm

    g = torch.Generator().manual_seed(8)
    r = lambda a, b: int(torch.randint(a, b + 1, (), generator=g))  # noqa: E731
    for case in range(300):
        d = (512, 64, 1, 17, 70, 33)[case % 6]
        bits = (16, 8, 17, 12, 4)[case % 5]
        wt = torch.randn(d, generator=g, dtype=torch.float64) * (10.0 ** r(-2, 2))
        bs = torch.randn(d, generator=g, dtype=torch.float64) * (10.0 ** r(-2, 3))
        s_in = float(torch.rand((), generator=g)) * 10.0 ** r(-3, 1) + 1e-4
        wide = case % 3 == 0
        lo, hi = (-(2**20), 2**20) if wide else (-128, 127)
        try:
            ln = IntLayerNorm(wt, bs, 1e-5 if case % 4 else 0.0, s_in, bits, 10.0 ** r(-3, 0),
                              r(-10, 10), lo, hi)  # fmt: skip
        except OverflowError:  # beta / s_out beyond int64: not a module
            continue
        lim = 2 ** (bits - 1)
        q = torch.randint(-lim, lim, (r(1, 6), d), generator=g, dtype=torch.int32)
        if case % 7 == 0:
            q[0] = q[0, 0]  # a constant row
        if case % 5 == 2:
            q[-1, : d // 2] = -lim  # half the row at the bottom end
        want = ln.normalize(q)
        want = torch.clamp(rshift_round(want * ln.m + ln.b, ln.e) + ln.z, lo, hi).to(ln.out_dtype)
        got = cpu.ext().layernorm(q, ln.f, ln.t, ln.k, int(ln.eps_q), ln.m, ln.e, ln.b, int(ln.z),
                                  lo, hi, 8, ln.out_dtype)  # fmt: skip
        assert torch.equal(got, want), case


def test_isqrt_is_floor_sqrt_next_to_squares():
    """LayerNorm's root (float64 sqrt + exact correction for >= 6 Newton steps; the steps
    themselves below): floor(sqrt v) at squares, one either side, and at random v < 2^63."""
    import math

    from hawq.integer.layernorm import isqrt

    g = torch.Generator().manual_seed(9)
    roots = torch.cat(
        [torch.randint(1, 2**31, (3000,), generator=g), torch.tensor([1, 2, 3, 2**31 - 1])]
    )
    roots = torch.cat([roots, torch.tensor([3037000499])])  # the largest root below 2^63
    v = torch.cat([roots * roots + d for d in (-1, 0, 1)])
    v = torch.cat(
        [v, torch.randint(0, 2**62, (3000,), generator=g), torch.tensor([0, 1, 2**63 - 1])]
    )
    v = v[v >= 0]
    want = torch.tensor([math.isqrt(int(x)) for x in v])
    for iters in (6, 8, 12):
        assert torch.equal(cpu.ext().check_isqrt(v, iters), want), iters
    small = v[v < 2**62]
    for iters in (1, 3, 8):  # the Newton steps (fewer than 6: not yet the root) = the reference
        assert torch.equal(cpu.ext().check_isqrt(small, iters), isqrt(small, iters)), iters


@pytest.mark.skipif(not hasattr(cpu.ext(), "check_floor_fix"), reason="no AVX-512")
def test_division_corrections_fix_estimates_one_off():
    """The correction step of every float64 floor division (softmax normalisation, LayerNorm)
    and of the softmax range reduction, on estimates forced one below, right and one above:
    the paths the real estimates take once in millions."""
    g = torch.Generator().manual_seed(10)
    n = 8 * 4000
    den = torch.randint(1, 2**40, (n,), generator=g, dtype=torch.int64)
    num = torch.randint(-(2**52), 2**52, (n,), generator=g, dtype=torch.int64)
    num[: n // 4] = (num[: n // 4] // den[: n // 4]) * den[: n // 4]  # exact multiples
    want = torch.div(num, den, rounding_mode="floor")
    for off in (-1, 0, 1):
        got = cpu.ext().check_floor_fix(num.double(), den.double(), (want + off).double())
        assert torch.equal(got.to(torch.int64), want), off
        scale = 2.0**-20  # the softmax form: numerator and denominator scaled by 2^-k
        got = cpu.ext().check_floor_fix(
            num.double() * scale, den.double() * scale, (want + off).double()
        )
        assert torch.equal(got.to(torch.int64), want), off
    if not hasattr(cpu.ext(), "check_divmod_fix"):  # the int32 softmax needs AVX-512 VNNI
        return
    for d in (1, 3, 8192, 11356, 2**17 + 1):
        nq = torch.randint(0, min(33 * d, 2**24), (16 * 500,), generator=g, dtype=torch.int32)
        nq[:16] = torch.arange(16, dtype=torch.int32) * d  # exact multiples
        z = torch.div(nq, d, rounding_mode="floor")
        for off in (-1, 0, 1):
            got = cpu.ext().check_divmod_fix(nq, d, z + off)
            assert torch.equal(got[0], z) and torch.equal(got[1], nq - z * d), (d, off)


@pytest.mark.skipif(not hasattr(cpu.ext(), "check_rshift_round32"), reason="no AVX-512 VNNI")
def test_rshift_round32_ties_and_ends():
    """The softmax's right shift of int32 scores (floor + half-to-even carry) against
    dyadic.rshift_round: exact halves of both parities, the int32 ends, every shift."""
    g = torch.Generator().manual_seed(11)
    for s in range(1, 32):
        base = torch.randint(
            -(2 ** (31 - s)), 2 ** (31 - s), (16 * 64,), generator=g, dtype=torch.int64
        )
        v = base * 2**s + 2 ** (s - 1)  # ties, odd and even floors
        v = torch.cat([v, v + 1, v - 1, torch.randint(-(2**31), 2**31, (16 * 64,), generator=g)])
        v = torch.cat([v, torch.tensor([-(2**31), 2**31 - 1] * 8)]).clamp(-(2**31), 2**31 - 1)
        got = cpu.ext().check_rshift_round32(v.to(torch.int32), s)
        assert torch.equal(got.to(torch.int64), rshift_round(v, s)), s
