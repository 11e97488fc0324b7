"""Conversion edge cases: dead output channels and BN channels with gamma ~ 0 (int32 bias
overflow), the integer LayerNorm's mean rounding (error bound at 8 residual bits), and the
scale guards of the integer softmax / GELU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.convert import convert
from hawq.integer.gelu import IntGELU, gelu_table
from hawq.integer.layernorm import IntLayerNorm, error_bound
from hawq.integer.softmax import IntSoftmax
from tests.integer.cases import fake_quant, randomize_bn, tiny_resnet, tiny_vit


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _close(q: nn.Module, im: nn.Module, tol: float = 0.1) -> None:
    x = _images(16, 2)
    with torch.no_grad():
        ref, out = q(x), im(x)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    xq = im.quantize_input(x)
    with ops.backend("reference"):
        r = im.forward_int(xq)
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(xq), r)


@pytest.mark.parametrize("layer", ["blocks.0.mlp.fc1", "blocks.1.attn.qkv", "head"])
def test_dead_linear_channel_with_bias_converts(layer):
    torch.manual_seed(0)
    net = tiny_vit()
    lin = net.get_submodule(layer)
    with torch.no_grad():
        lin.weight[3].zero_()  # a dead output channel ...
        lin.bias[3] = 0.7  # ... with a non-zero bias
        lin.weight[5].mul_(1e-9)  # and a nearly dead one
        lin.bias[5] = -0.4
    q = fake_quant(net, _images(32, 1))
    _close(q, convert(q, [(_images(32, 1),)]))


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 1e-12, -1e-9])
def test_bn_gamma_near_zero_converts(fold_bn, gamma):
    torch.manual_seed(0)
    net = tiny_resnet()
    randomize_bn(net)
    with torch.no_grad():
        for bn in (net.bn1, net.layer1[0].bn2, net.layer2[0].bn1):
            bn.weight[1] = gamma
            bn.bias[1] = 0.3
    q = fake_quant(net, _images(32, 1), fold_bn=fold_bn)
    _close(q, convert(q, [(_images(32, 1),)]))


def _layernorm_errors(bits: int, f_override: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = 64
    ln = IntLayerNorm(torch.ones(d), torch.zeros(d), 1e-5, 0.05, bits, 2.0**-8, 0,
                      -(2**30), 2**30)  # fmt: skip
    if f_override is not None:
        ln.f = f_override
        ln.eps_q = torch.tensor(round(1e-5 * 4.0 ** (ln.t + ln.f) / 0.05**2))
    lim = 2 ** (bits - 1)
    sig = torch.randint(1, lim // 2, (400, 1), generator=g).double()  # row spreads
    q = torch.clamp(torch.round(torch.randn(400, d, generator=g, dtype=torch.float64) * sig
                                + torch.rand(400, 1, generator=g) * 7), -lim, lim - 1)  # fmt: skip
    q = q.to(torch.int32)
    y = ln.normalize(q).double()
    qd = q.double()
    c = qd - qd.mean(-1, keepdim=True)
    sigma = torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-5 / 0.05**2)
    exact = 2.0**ln.k * c / sigma
    _, v, r = ln.stats(q)
    return (y - exact).abs(), error_bound(c, sigma, r.double(), v.double(), ln.f, ln.k), ln


@pytest.mark.parametrize("bits", [6, 8, 12, 16])
def test_layernorm_error_within_its_bound(bits):
    err, bound, ln = _layernorm_errors(bits)
    assert (err <= bound).all(), (err - bound).max()
    # honest and not vacuous: <= 0.5% of the unit output even at sigma ~ 1 code
    assert bound.max() <= 0.005 * 2.0**ln.k


def test_layernorm_mean_fraction_bits_fix_residual_8():
    err_f, _, ln = _layernorm_errors(8)
    err_0, _, _ = _layernorm_errors(8, f_override=0)  # the old whole-code mean
    assert ln.f >= 6
    assert err_f.max() * 20 < err_0.max()  # the mean rounding was the dominant error


def test_layernorm_cpu_kernel_matches_for_fraction_bits():
    torch.manual_seed(0)
    ln = IntLayerNorm(torch.randn(40), torch.randn(40), 1e-6, 0.1, 8, 0.03, 3, -128, 127)
    q = torch.randint(-128, 128, (50, 40), dtype=torch.int32)
    with ops.backend("reference"):
        ref = ln(q)
    with ops.backend("cpu"):
        assert torch.equal(ln(q), ref)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, 1e-40, 1e9, 1e30])
def test_softmax_rejects_extreme_scales(scale):
    with pytest.raises(HawqError):
        IntSoftmax(scale)  # int32 scores: 1e9 would shift them past int64


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1.0, 1e3])
def test_softmax_accepts_wide_scale_range_and_sums_to_one(scale):
    sm = IntSoftmax(scale)
    q = torch.randint(-(2**30), 2**30, (8, 33), generator=torch.Generator().manual_seed(0))
    out = sm(q.to(torch.int32)).double() * sm.out_scale
    assert (out >= 0).all() and ((out.sum(-1) - 1).abs() <= 33 * sm.out_scale + 3e-3).all()


@pytest.mark.parametrize("scale", [0.0, -0.1, math.inf, math.nan, 10.0, 1e-30])
def test_gelu_rejects_extreme_scales(scale):
    with pytest.raises(HawqError):
        IntGELU(scale, 2**15 - 1)


@pytest.mark.parametrize("scale", [0.0, math.nan, -1.0])
def test_gelu_table_rejects_bad_scales(scale):
    with pytest.raises(HawqError):
        gelu_table(scale, -10, 10, 0.1, 0, -128, 127)
    with pytest.raises(HawqError):
        gelu_table(0.1, -10, 10, scale, 0, -128, 127)


def test_gelu_table_is_the_rounded_gelu():
    s, so = 10.0 / 32767, 0.03
    t = gelu_table(s, -32767, 32767, so, -5, -128, 127)
    x = torch.arange(-32767, 32768, dtype=torch.float64) * s
    g = torch.nn.functional.gelu(x)  # float64 erf GELU
    expect = torch.clamp(torch.round(g / so) - 5, -128, 127)
    assert torch.equal(t.long(), expect.long())
    poly = IntGELU(s, 32767)
    err_poly = (poly(torch.arange(-32767, 32768)).double() * poly.out_scale - g).abs().max()
    err_table = ((t.double() + 5) * so - g).abs()[(g / so + -5).abs() < 120].max()
    assert err_table <= so / 2 + 1e-12 and err_poly > 4 * (so / 2) * 0.1
