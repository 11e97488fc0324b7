"""The seed study's dynamic min/max quantizer vs a numpy reference written from its document.

Reference (section 1.2.1.1 of ``vit-cifar10-int4-int2-study.md``), float32 IEEE arithmetic::

    s = (r_max - r_min) / (2^n - 1);  z = round(q_max - r_max / s)
    q = round(r / s + z) in 0..2^n-1;  r_hat = s (q - z)

and the document's integer matmul expansion ``C = s_A s_B (Q_A Q_B - Z_B Q_A 1 - Z_A 1 Q_B
+ Z_A Z_B K)``. Constant tensors (``s = 0``) are defined by :mod:`hawq.quant.minmax_exact`:
pass through, codes ``q_max``.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hawq.quant import Plan, quantize_
from hawq.quant.minmax_exact import (
    exact_minmax_codes,
    exact_minmax_fake_quantize,
    exact_minmax_qparams,
)
from hawq.quant.modules import QuantLinear, QuantMatMul
from hawq.quant.plan import OpSetting
from hawq.quant.primitives import choose_qparams, fake_quantize
from hawq.quant.quantizer import Quantizer
from tests.quant.cases import tiny_vit

SEED_SETTING = {"granularity": "per_tensor", "symmetric": False, "a_symmetric": False,
                "calibrator": "minmax", "dynamic": True}  # fmt: skip


def reference(r: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(codes, r_hat, s, z)`` from the document's formulas in float32 numpy."""
    r = np.asarray(r, dtype=np.float32)
    q_max = np.float32(2**n - 1)
    r_max, r_min = r.max(), r.min()
    if r_max == r_min:  # s = 0: the defined limit (pass through, code q_max)
        return np.full_like(r, q_max), r.copy(), 0.0, float(q_max)
    s = np.float32((r_max - r_min) / q_max)
    z = np.round(np.float32(q_max - np.float32(r_max / s)))
    q = np.clip(np.round(np.float32(r / s) + z), 0, q_max).astype(np.float32)
    return q, (s * (q - z)).astype(np.float32), float(s), float(z)


def _bits_equal(a: torch.Tensor, b: np.ndarray) -> None:
    a = a.detach().numpy().astype(np.float32)
    np.testing.assert_array_equal(a + np.float32(0), b + np.float32(0))  # -0 == +0


def _check(x: torch.Tensor, n: int) -> None:
    codes, r_hat, s, z = reference(x.numpy(), n)
    q_max = 2**n - 1
    lo, hi = torch.aminmax(x)
    s_t, z_t = exact_minmax_qparams(lo, hi, q_max)
    assert float(s_t) == s and float(z_t) == z
    _bits_equal(exact_minmax_codes(x, s_t, z_t, q_max), codes)
    quant = Quantizer(n, symmetric=False, dynamic=True)  # what the seed setting builds
    _bits_equal(quant(x), r_hat)
    _bits_equal(exact_minmax_fake_quantize(x, q_max), r_hat)


finite = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 200), elements=finite), st.sampled_from([2, 4, 8]))
def test_bit_exact_with_the_document(values, n):
    _check(torch.from_numpy(values), n)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "softmax", "positive_shifted", "negative"])
def test_bit_exact_on_operand_kinds(n, kind):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, 8, 17, 17, generator=g)
    if kind == "softmax":
        x = torch.softmax(x * 3, dim=-1)  # min > 0: the attn@v operand
        assert float(x.min()) > 0
    elif kind == "positive_shifted":
        x = x.abs() + 5.0
    elif kind == "negative":
        x = -x.abs() - 0.25  # max < 0
    _check(x, n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_softmax_zero_point_is_not_clamped_and_range_not_widened(n):
    x = torch.softmax(torch.randn(2, 4, 17, 17, generator=torch.Generator().manual_seed(0)) * 0.1,
                      dim=-1)  # fmt: skip  (a flat attention row: r_min well above 0)
    q_max = 2**n - 1
    s, z = exact_minmax_qparams(*torch.aminmax(x), q_max)
    assert float(z) < 0  # round(q_max - r_max/s) with r_max/s > q_max
    assert float(s) == float((x.max() - x.min()) / q_max)
    out = Quantizer(n, symmetric=False, dynamic=True)(x)
    # the grid's lowest level is near r_min, not 0: every value is within s/2
    assert float((out - x).abs().max()) <= float(s) / 2 * (1 + 1e-5)
    # the widened, clamped quantizer (choose_qparams) differs on this operand
    sw, zw = choose_qparams(x.min(), x.max(), n, symmetric=False)
    widened = fake_quantize(x, sw, zw, 0, q_max)
    assert bool((widened != out).any())


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("value", [0.0, 3.75, -2.5, 1e-30])
def test_constant_tensor_passes_through_with_code_q_max(n, value):
    x = torch.full((3, 5), value)
    q_max = 2**n - 1
    s, z = exact_minmax_qparams(*torch.aminmax(x), q_max)
    assert float(s) == 0 and float(z) == q_max
    assert bool((exact_minmax_codes(x, s, z, q_max) == q_max).all())
    out = Quantizer(n, symmetric=False, dynamic=True)(x)
    assert torch.isfinite(out).all()
    _bits_equal(out, reference(x.numpy(), n)[1])
    assert torch.equal(out, x)


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_per_channel_and_group_apply_the_formula_per_slice(granularity):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    w[2] = 0.5  # one constant channel / groups
    out = exact_minmax_fake_quantize(w, 15, granularity, 0, 16)
    rows = w.reshape(6, 2, 16) if granularity == "per_group" else w.reshape(6, 1, 32)
    want = np.stack([np.stack([reference(r.numpy(), 4)[1] for r in row]) for row in rows])
    _bits_equal(out, want.reshape(6, 32))


def test_gradient_is_the_seed_ste():
    x = torch.randn(50, requires_grad=True)
    y = Quantizer(4, symmetric=False, dynamic=True)(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_seed_plan_quantizes_every_operand_of_a_vit_exactly():
    """Every operand of every op of a ViT under the seed setting (both activation matmuls
    included) equals the reference of that very operand, for n = 2, 4, 8."""
    torch.manual_seed(0)
    fp = tiny_vit().eval()
    x = torch.randn(8, 3, 32, 32)
    for n in (2, 4, 8):
        model = quantize_(copy.deepcopy(fp), Plan.from_dict({"_default": {**SEED_SETTING,
                                                                    "w_bits": n, "a_bits": n}}))
        seen = []

        def hook(mod, args, out, n=n, seen=seen):
            if isinstance(mod, QuantMatMul):
                a, b = args
                want = reference(a.numpy(), n)[1] @ reference(b.numpy(), n)[1]
                got = mod.a_quant(a) @ mod.b_quant(b)
                _bits_equal(mod.a_quant(a), reference(a.numpy(), n)[1])
                _bits_equal(mod.b_quant(b), reference(b.numpy(), n)[1])
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
            else:
                _bits_equal(mod.a_quant(args[0]), reference(args[0].numpy(), n)[1])
                _bits_equal(mod.quantized_weight(), reference(mod.weight.detach().numpy(), n)[1])
            seen.append(type(mod).__name__)

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, (QuantLinear, QuantMatMul))]  # fmt: skip
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        assert seen.count("QuantMatMul") == 2 * 2 and len(seen) == 2 * 6 + 2  # depth 2


@pytest.mark.parametrize("n", [2, 4, 8])
def test_document_integer_matmul_equals_the_fake_quant_product(n):
    """``C = s_A s_B (Q_A Q_B - Z_B Q_A 1 - Z_A 1 Q_B + Z_A Z_B K)`` with integer codes."""
    g = torch.Generator().manual_seed(n)
    a = torch.softmax(torch.randn(2, 3, 9, 9, generator=g), -1)  # attn
    b = torch.randn(2, 3, 9, 5, generator=g)  # v
    qa, ra, sa, za = reference(a.numpy(), n)
    qb, rb, sb, zb = reference(b.numpy(), n)
    qa64, qb64 = qa.astype(np.int64), qb.astype(np.int64)
    k = a.shape[-1]
    integer = (qa64 @ qb64 - zb * qa64.sum(-1, keepdims=True)
               - za * qb64.sum(-2, keepdims=True) + int(za) * int(zb) * k)  # fmt: skip
    c = sa * sb * integer.astype(np.float64)
    op = QuantMatMul(OpSetting(**SEED_SETTING, w_bits=n, a_bits=n))
    got = op(a, b).double().numpy()
    np.testing.assert_allclose(got, c, rtol=1e-5, atol=1e-6 * np.abs(c).max())
