"""Dyadic requantization: exact oracle, float reference, overflow bound."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.integer import ops
from hawq.integer.dyadic import (
    Requant,
    acc_bound,
    check_accumulator,
    dyadic,
    dyadic_value,
    round_half_even_exact,
    rshift_round,
)

scales = st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)
accs = st.integers(min_value=-(2**31) + 1, max_value=2**31 - 1)


@settings(deadline=None, max_examples=200)
@given(s=scales, neg=st.booleans())
def test_dyadic_relative_error(s, neg):
    s = -s if neg else s
    m, e = dyadic(s)
    assert abs(int(m)) < 2**31 and 0 <= int(e) <= 62
    exact = Fraction(int(m), 2 ** int(e))
    assert abs(exact - Fraction(s)) <= Fraction(1, 2 ** (int(e) + 1))
    assert abs(float(dyadic_value(m, e)) - s) <= 2.0**-31 * abs(s)


@settings(deadline=None, max_examples=300)
@given(v=st.integers(min_value=-(2**62), max_value=2**62), e=st.integers(0, 40))
def test_rshift_round_is_round_half_even(v, e):
    expect = round_half_even_exact(v, 2**e)
    assert int(rshift_round(torch.tensor([v]), e)) == expect
    assert int(rshift_round(torch.tensor([v]), torch.tensor([e]))) == expect


def test_rshift_round_ties_go_to_even():
    v = torch.tensor([5, 7, -5, -7, 6, -6, 3, -3])  # /2 = 2.5 3.5 -2.5 -3.5 3 -3 1.5 -1.5
    assert rshift_round(v, 1).tolist() == [2, 4, -2, -4, 3, -3, 2, -2]
    assert torch.round(v / 2.0).long().tolist() == [2, 4, -2, -4, 3, -3, 2, -2]


@settings(deadline=None, max_examples=200)
@given(acc=accs, s=st.floats(1e-7, 0.99), z=st.integers(-128, 127))
def test_requant_equals_exact_rational_rounding(acc, s, z):
    rq = Requant.from_scale(s, z, -(2**40), 2**40, torch.int64)
    m, e = int(rq.m), int(rq.e)
    expect = round_half_even_exact(acc * m, 2**e) + z
    assert int(rq(torch.tensor([acc]))) == expect


@settings(deadline=None, max_examples=200)
@given(acc=accs, s=st.floats(1e-7, 0.99))
def test_requant_matches_float_reference_except_near_ties(acc, s):
    """round(acc * s) in float64 (the fake-quant rounding) agrees unless acc*s is a near-tie."""
    rq = Requant.from_scale(s, 0, -(2**40), 2**40, torch.int64)
    got = int(rq(torch.tensor([acc])))
    ref = torch.round(torch.tensor(acc, dtype=torch.float64) * s).item()
    if got != ref:
        x = Fraction(acc) * Fraction(s)
        frac = x - math.floor(x)
        slack = abs(Fraction(acc)) * abs(Fraction(s) - Fraction(int(rq.m), 2 ** int(rq.e)))
        assert abs(frac - Fraction(1, 2)) <= slack + Fraction(abs(acc * s)) * Fraction(2**-52)
        assert abs(got - ref) == 1


def test_per_channel_requant_clamps_and_zero_points():
    rq = Requant.from_scale(torch.tensor([0.5, 0.25]), torch.tensor([3, -3]), -8, 7)
    out = rq(torch.tensor([[4, 4], [100, -100]]))
    assert out.dtype == torch.int8
    assert out.tolist() == [[5, -2], [7, -8]]


def test_no_int32_overflow_up_to_k_8192_at_8_bits():
    """Worst case |acc| = K * 128 * 128 for x = w = -128; the bound K 2^15 stays < 2^31."""
    k = 8192
    assert acc_bound(k, 8, 8) == 2**28 < 2**31
    assert check_accumulator(k, torch.tensor([2**30]), 8, 8) < 2**31
    x = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -128, dtype=torch.int8)
    bias = torch.full((3,), -(2**27), dtype=torch.int32)  # the size of a folded z_x sum_k w
    acc = ops.int_linear(x, w, bias)
    assert acc.dtype == torch.int32
    exact = (x.long() @ w.long().t()) + bias.long()
    assert torch.equal(acc.long(), exact) and exact.abs().max() < 2**31
    with pytest.raises(OverflowError):
        check_accumulator(2**17, None, 8, 8)
    with pytest.raises(OverflowError):
        check_accumulator(8192, torch.tensor([2**31 - 2**27]), 8, 8)
