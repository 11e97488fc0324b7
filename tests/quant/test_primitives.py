"""Properties of the uniform quantizer over bits, granularity and scheme."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_grouped,
    fake_quantize_tensor,
    group_view,
    qrange,
    quantize,
    reduce_range,
)

GRANS = ["per_tensor", "per_channel", "per_group"]


@st.composite
def cases(draw):
    bits = draw(st.integers(1, 8))
    symmetric = draw(st.booleans())
    gran = draw(st.sampled_from(GRANS))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**16))
    shift = draw(st.floats(-3, 3))
    spread = draw(st.floats(1e-3, 100))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, dtype=torch.float64) + shift) * spread
    return bits, symmetric, gran, x, draw(st.integers(1, 8))


def qparams(x, bits, symmetric, gran, gs):
    lo, hi = reduce_range(x, gran, 0, gs)
    scale, zp = choose_qparams(lo, hi, bits, symmetric)
    return scale, zp, *qrange(bits, symmetric)


def view(x, gran, gs):
    return group_view(x, gs) if gran == "per_group" else x


@settings(max_examples=150, deadline=None)
@given(cases())
def test_values_on_grid_idempotent_and_error_bounded(case):
    bits, symmetric, gran, x, gs = case
    scale, zp, q_min, q_max = qparams(x, bits, symmetric, gran, gs)
    y = fake_quantize_grouped(x, scale, zp, q_min, q_max, gran, gs)
    yv, xv = view(y, gran, gs), view(x, gran, gs)
    real = view(torch.ones_like(x), gran, gs) > 0  # not the zero padding of the last group
    # on the grid: (y / s + z) is an integer in [q_min, q_max]
    codes = (yv / scale + zp)[real]
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    assert codes.min() >= q_min - 1e-6 and codes.max() <= q_max + 1e-6
    # idempotent with the same qparams
    assert torch.equal(fake_quantize_grouped(y, scale, zp, q_min, q_max, gran, gs), y)
    # error <= s/2 inside the grid's range
    lo, hi = (q_min - zp) * scale, (q_max - zp) * scale
    inside = (xv >= lo) & (xv <= hi) & real
    err = (yv - xv).abs()
    assert (err <= scale / 2 * (1 + 1e-9) + 1e-12)[inside].all()
    # the min/max range itself is covered to within s/2 (nothing clipped by more)
    assert (err <= scale / 2 * (1 + 1e-9) + 1e-12).all() or bits == 1


@settings(max_examples=80, deadline=None)
@given(cases())
def test_zero_exact_for_asymmetric(case):
    bits, _, gran, x, gs = case
    scale, zp, q_min, q_max = qparams(x, bits, False, gran, gs)
    assert torch.equal(zp, zp.round()) and (zp >= q_min).all() and (zp <= q_max).all()
    zero = torch.zeros_like(x)
    assert torch.equal(fake_quantize_grouped(zero, scale, zp, q_min, q_max, gran, gs), zero)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_ste_mask(case):
    bits, symmetric, _, x, _ = case
    scale = (x.abs().max() / 4).clamp(min=1e-6)  # a deliberately small range: some x clip
    zp = torch.tensor(0.5 if (symmetric and bits == 1) else 0.0, dtype=x.dtype)
    q_min, q_max = qrange(bits, symmetric)
    x = x.clone().requires_grad_(True)
    fake_quantize(x, scale, zp, q_min, q_max).sum().backward()
    lo, hi = (q_min - zp) * scale, (q_max - zp) * scale
    expected = ((x >= lo) & (x <= hi)).to(x.dtype)
    assert torch.equal(x.grad, expected)


def test_quantize_dequantize_roundtrip_and_ranges():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15) and qrange(1, True) == (0, 1)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    s, z = choose_qparams(x.min(), x.max(), 8, symmetric=False)
    q = quantize(x, s, z, 0, 255)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 255
    assert torch.allclose(dequantize(q, s, z), x, atol=float(s) / 2)


def test_one_bit_sign():
    x = torch.tensor([-3.0, -0.1, 0.2, 2.0])
    y = fake_quantize_tensor(x, 1, symmetric=True)
    assert torch.equal(y, torch.tensor([-1.5, -1.5, 1.5, 1.5]))  # +-max/2


@pytest.mark.parametrize("gran", GRANS)
def test_fake_quantize_tensor_shapes_and_monotone_error(gran):
    w = torch.randn(16, 8, 3, 3)
    errs = [((fake_quantize_tensor(w, b, True, gran, 24) - w) ** 2).sum().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    assert fake_quantize_tensor(w, 4, True, gran, 24).shape == w.shape
