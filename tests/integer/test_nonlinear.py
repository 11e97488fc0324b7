"""Integer GELU, softmax and LayerNorm against float, with their stated error bounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.integer.gelu import IntGELU
from hawq.integer.layernorm import IntLayerNorm, bit_length, isqrt
from hawq.integer.softmax import IntSoftmax

GELU_ERR = 0.02  # I-BERT's fit: measured max 0.0182 on [-8, 8]
SOFTMAX_ERR = 2e-4  # exp table: working-scale rounding (<= 4.3e-5 relative) and the 2^-16 floors
LN_ERR = 2e-3  # normalised value (x - mean) / sigma, 16-bit input


@settings(deadline=None, max_examples=25)
@given(x_max=st.floats(1.0, 64.0), seed=st.integers(0, 2**16))
def test_gelu_error_and_monotone(x_max, seed):
    bits = 16
    in_max = 2 ** (bits - 1) - 1
    g = IntGELU(x_max / in_max, in_max)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-in_max, in_max + 1, (4096,), generator=gen)
    out = g(q).double() * g.out_scale
    ref = F.gelu(q.double() * g.scale)
    assert (out - ref).abs().max() <= GELU_ERR
    assert g(q).abs().max() < 2**31  # fits the int32 input of a requantizer
    qs = torch.arange(0, in_max + 1, max(1, in_max // 5000))
    assert (g(qs).diff() >= 0).all()  # GELU is increasing on x >= 0


@settings(deadline=None, max_examples=25)
@given(log_scale=st.floats(-14.0, 2.0), spread=st.floats(0.1, 20.0), seed=st.integers(0, 2**16))
def test_softmax_error_monotone_and_normalised(log_scale, spread, seed):
    s = 2.0**log_scale
    sm = IntSoftmax(s)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 65, generator=gen, dtype=torch.float64) * spread
    q = torch.clamp(torch.round(x / s), -(2**31) + 1, 2**31 - 1).long()
    out = sm(q)
    ref = torch.softmax(q.double() * s, dim=-1)
    assert (out.double() * sm.out_scale - ref).abs().max() <= SOFTMAX_ERR
    order = q.argsort(dim=-1)
    assert (out.gather(-1, order).diff(dim=-1) >= 0).all()  # x_i <= x_j -> p_i <= p_j
    total = out.sum(-1)
    assert (total <= 2**sm.out_bits).all() and (total >= 2**sm.out_bits - 65).all()


def test_integer_exp_is_monotone_over_a_full_range():
    sm = IntSoftmax(1e-3)
    q = torch.arange(-40000, 1).reshape(1, -1)
    out = sm(torch.cat([q, torch.zeros(1, 1, dtype=torch.long)], dim=1))
    assert (out.diff(dim=-1) >= 0).all()


@settings(deadline=None, max_examples=50)
@given(v=st.lists(st.integers(0, 2**62 - 1), min_size=1, max_size=64))
def test_isqrt_exact(v):
    t = torch.tensor(v, dtype=torch.int64)
    r = isqrt(t)
    ok_lo = r * r <= t
    ok_hi = (r + 1) * (r + 1) > t
    assert bool((ok_lo & ok_hi)[t > 0].all())


def test_isqrt_every_magnitude_and_around_squares():
    """Fixed Newton steps are enough at every bit length, at k^2 - 1, k^2, k^2 + 1 and the
    ends of the range (oracle: math.isqrt)."""
    import math
    import random

    rng = random.Random(0)
    vals = [0, 1, 2, 3, 2**62 - 1, 2**62]
    vals += [rng.randrange(2**e, 2 ** (e + 1)) for e in range(62) for _ in range(50)]
    ks = [rng.randrange(1, 2**31) for _ in range(3000)] + [2**31 - 1, 2**16, 3]
    vals += [k * k + d for k in ks for d in (-1, 0, 1)]
    t = torch.tensor(vals, dtype=torch.int64)
    assert bit_length(t).tolist() == [v.bit_length() for v in vals]
    assert isqrt(t).tolist() == [math.isqrt(v) for v in vals]


@settings(deadline=None, max_examples=20)
@given(d=st.sampled_from([16, 64, 512]), amp=st.floats(0.05, 50.0), seed=st.integers(0, 2**16))
def test_layernorm_error(d, amp, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(256, d, generator=gen, dtype=torch.float64) + 0.5) * amp
    in_bits = 16
    lim = 2 ** (in_bits - 1) - 1
    s_in = float(x.abs().max()) / lim
    q = torch.round(x / s_in).long()
    xq = q.double() * s_in
    gamma = torch.randn(d, generator=gen, dtype=torch.float64)
    beta = torch.randn(d, generator=gen, dtype=torch.float64)
    s_out = 8 / 127
    ln = IntLayerNorm(gamma, beta, 1e-5, s_in, in_bits, s_out, 0, -128, 127)
    y = ln.normalize(q).double() * 2.0**-ln.k
    ref = F.layer_norm(xq, (d,), eps=1e-5)
    assert (y - ref).abs().max() <= LN_ERR
    out = ln(q).double()
    ref_q = torch.clamp(torch.round(F.layer_norm(xq, (d,), gamma, beta, 1e-5) / s_out), -128, 127)
    assert (out - ref_q).abs().max() <= 1
    assert (out != ref_q).double().mean() < 0.01
