"""Integer kernels: reference vs exact int64 oracles, every backend bit-exact, int4 packing."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.integer import ops
from hawq.integer.dyadic import Requant


def _case(m=37, k=72, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    b = torch.randint(-(2**20), 2**20, (n,), generator=g, dtype=torch.int32)
    rq = Requant.from_scale(torch.rand(n, generator=g, dtype=torch.float64) * 1e-4,
                            torch.randint(-20, 20, (n,), generator=g), -128, 127)  # fmt: skip
    return x, w, b, rq


def test_int_linear_reference_is_exact():
    x, w, b, rq = _case()
    acc = x.long() @ w.long().t() + b.long()  # int64 oracle
    assert torch.equal(ops.int_linear(x, w, b).long(), acc)
    assert torch.equal(ops.int_linear(x, w, b, rq), rq(acc))


def test_int_matmul_zero_points_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (2, 3, 9, 16), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (2, 3, 16, 5), generator=g, dtype=torch.int8)
    expect = (a.long() - 7) @ (b.long() + 3)
    assert torch.equal(ops.int_matmul(a, b, 7, -3).long(), expect)


def test_int_conv2d_pads_with_the_zero_point():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (2, 3, 7, 7), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (4, 3, 3, 3), generator=g, dtype=torch.int8)
    z = -11
    out = ops.int_conv2d(x, w, None, None, stride=2, padding=1, pad_value=z).long()
    xp = F.pad(x.long(), (1, 1, 1, 1), value=z)
    brute = torch.zeros_like(out)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = xp[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # (B, C, 3, 3)
            brute[:, :, i, j] = torch.einsum("bcij,ncij->bn", patch, w.long())
    assert torch.equal(out, brute)


@settings(deadline=None, max_examples=50)
@given(vals=st.lists(st.integers(-8, 7), min_size=1, max_size=65), rows=st.integers(1, 3))
def test_int4_pack_roundtrip(vals, rows):
    w = torch.tensor(vals * rows, dtype=torch.int8).reshape(rows, -1)
    p = ops.pack_int4(w)
    assert p.dtype == torch.uint8 and p.shape[-1] == (w.shape[-1] + 1) // 2
    assert torch.equal(ops.unpack_int4(p, w.shape[-1]), w)


def test_int4_packed_linear_equals_unpacked():
    x, _, b, rq = _case(seed=3)
    w4 = torch.randint(-8, 8, (24, 72), dtype=torch.int8)
    assert torch.equal(ops.int_linear(x, ops.pack_int4(w4), b, rq), ops.int_linear(x, w4, b, rq))


def test_int_mm_backend_bit_exact():
    x, w, b, rq = _case(m=40, k=64, n=32)
    with ops.backend("int_mm"):
        got = ops.int_linear(x, w, b, rq)
    assert torch.equal(got, ops.int_linear(x, w, b, rq))


def _triton_interpreted():
    if torch.cuda.is_available():
        return True
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    return True


@pytest.mark.parametrize("int4", [False, True])
def test_triton_kernel_bit_exact_with_reference(int4):
    """The fused GEMM + requant kernel (Triton interpreter on CPU) equals the reference."""
    _triton_interpreted()
    x, w, b, rq = _case(m=45, k=100, n=40, seed=4)
    if int4:
        w = torch.randint(-8, 8, w.shape, dtype=torch.int8)
    wk = ops.pack_int4(w) if int4 else w
    ref, ref32 = ops.int_linear(x, w, b, rq), ops.int_linear(x, w, b)
    with ops.backend("triton"):
        assert torch.equal(ops.int_linear(x, wk, b, rq), ref)
        assert torch.equal(ops.int_linear(x, wk, b), ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("be", ["int_mm", "triton"])
def test_cuda_backends_bit_exact(be):
    x, w, b, rq = _case(m=256, k=512, n=256, seed=5)
    ref = ops.int_linear(x, w, b, rq)
    with ops.backend(be):
        got = ops.int_linear(x.cuda(), w.cuda(), b.cuda(), rq.to("cuda"))
    assert torch.equal(got.cpu(), ref)
