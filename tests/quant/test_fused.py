"""The fused quantizer autograd Functions equal the composite implementations (float64).

Value: bit-identical. Gradients (to the input, step size, offset, clip) for a random
upstream gradient ``G``: the fused input gradient is exactly ``mask * G`` (the composite
LSQ one is ``G * s / s``, so equal to round-off there, bit-identical for PACT/STE);
reductions (scale, offset, clip gradients) equal to float64 round-off.
"""

import pytest
import torch

from hawq.models import ViT
from hawq.quant import OpSetting, Plan, quantize_
from hawq.quant.learnable import (
    lsq_fake_quantize,
    lsq_fake_quantize_reference,
    lsqplus_fake_quantize,
    lsqplus_fake_quantize_reference,
    pact_fake_quantize,
    pact_fake_quantize_reference,
)
from hawq.quant.primitives import (
    choose_qparams,
    fake_quantize,
    fake_quantize_reference,
    qrange,
    reduce_range,
)
from hawq.quant.quantizer import MIN_SCALE, Quantizer

from .cases import batches

F64 = torch.float64


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grads(fn, inputs, upstream):
    ins = [leaf(t) for t in inputs]
    out = fn(*ins)
    gs = torch.autograd.grad(out, ins, upstream)
    return out.detach(), gs


def check(fused, reference, inputs, shape, exact_x=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(shape, generator=gen, dtype=F64)
    y1, g1 = grads(fused, inputs, upstream)
    y2, g2 = grads(reference, inputs, upstream)
    assert torch.equal(y1, y2), (y1 - y2).abs().max()
    if exact_x:
        assert torch.equal(g1[0], g2[0])
    else:
        assert torch.allclose(g1[0], g2[0], rtol=1e-14, atol=0)
        assert torch.equal(g1[0] == 0, g2[0] == 0)  # the same STE mask
    for a, b in zip(g1[1:], g2[1:]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-13), (a, b)


def x_data(shape=(16, 8, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2


@pytest.mark.parametrize(("bits", "symmetric", "scale_shape"),
                         [(4, True, ()), (2, True, ()), (3, False, ()), (8, False, ()),
                          (4, True, (16, 1, 1)), (3, False, (1, 8, 1))])  # fmt: skip
def test_lsq_fused_equals_composite(bits, symmetric, scale_shape):
    x = x_data()
    q_min, q_max = qrange(bits, symmetric)
    g = torch.Generator().manual_seed(1)
    s = 0.1 + 0.4 * torch.rand(scale_shape, generator=g, dtype=F64)
    z = torch.full(scale_shape, float(q_min + (q_max - q_min) // 3), dtype=F64)
    gs = 0.037
    if symmetric:
        check(lambda x_, s_: lsq_fake_quantize(x_, s_, q_min, q_max, gs),
              lambda x_, s_: lsq_fake_quantize_reference(x_, s_, q_min, q_max, gs),
              (x, s), x.shape)  # fmt: skip
    else:
        check(lambda x_, s_: lsq_fake_quantize(x_, s_, q_min, q_max, gs, z),
              lambda x_, s_: lsq_fake_quantize_reference(x_, s_, q_min, q_max, gs, z),
              (x, s), x.shape)  # fmt: skip


def test_lsq_min_scale_chains_through_abs_and_clamp():
    """The quantizer's ``max(|s|, s_min)`` inside the fused node: negative and collapsed s."""
    x = x_data((4, 50))
    q_min, q_max = qrange(4, True)
    s = torch.tensor([[-0.3], [0.2], [1e-12], [0.5]], dtype=F64)
    check(lambda x_, s_: lsq_fake_quantize(x_, s_, q_min, q_max, 0.1, None, 1e-8),
          lambda x_, s_: lsq_fake_quantize_reference(x_, s_.abs().clamp(min=1e-8), q_min,
                                                     q_max, 0.1),
          (x, s), x.shape)  # fmt: skip


@pytest.mark.parametrize("scale_shape", [(), (1, 8, 1)])
def test_lsqplus_fused_equals_composite(scale_shape):
    x = x_data(seed=3)
    q_min, q_max = qrange(4, False)
    s = torch.full(scale_shape, 0.25, dtype=F64)
    beta = torch.full(scale_shape, -1.5, dtype=F64)
    check(lambda x_, s_, b_: lsqplus_fake_quantize(x_, s_, b_, q_min, q_max, 0.02),
          lambda x_, s_, b_: lsqplus_fake_quantize_reference(x_, s_, b_, q_min, q_max, 0.02),
          (x, s, beta), x.shape)  # fmt: skip


@pytest.mark.parametrize(("bits", "signed"), [(4, False), (4, True), (2, True), (8, False)])
def test_pact_fused_equals_composite(bits, signed):
    """Equal away from exact ties x = +-alpha, 0 (where the composite splits gradients)."""
    x = x_data(seed=4)
    x = torch.where(x == 0, 0.5, x)
    alpha = torch.tensor(1.7, dtype=F64)
    check(lambda x_, a_: pact_fake_quantize(x_, a_, bits, signed),
          lambda x_, a_: pact_fake_quantize_reference(x_, a_, bits, signed),
          (x, alpha), x.shape, exact_x=True)  # fmt: skip


@pytest.mark.parametrize(("bits", "symmetric", "gran"),
                         [(4, True, "per_tensor"), (3, False, "per_tensor"),
                          (1, True, "per_tensor"), (4, False, "per_channel")])  # fmt: skip
def test_ste_fake_quantize_fused_equals_composite(bits, symmetric, gran):
    x = x_data(seed=5)
    lo, hi = reduce_range(x * 0.8, gran, axis=1)  # some values clip
    s, z = choose_qparams(lo, hi, bits, symmetric)
    q_min, q_max = qrange(bits, symmetric)
    check(lambda x_: fake_quantize(x_, s, z, q_min, q_max),
          lambda x_: fake_quantize_reference(x_, s, z, q_min, q_max), (x,), x.shape, True)
    if symmetric and bits > 1:  # zero point None == an all-zero zero point
        assert torch.equal(fake_quantize(x, s, None, q_min, q_max),
                           fake_quantize_reference(x, s, z, q_min, q_max))  # fmt: skip


def test_no_grad_fast_path_same_value():
    x = x_data()
    s = torch.tensor(0.3, dtype=F64, requires_grad=True)
    a = torch.tensor(1.1, dtype=F64, requires_grad=True)
    y = lsq_fake_quantize(x, s, -8, 7, 0.1)
    with torch.no_grad():
        assert torch.equal(lsq_fake_quantize(x, s, -8, 7, 0.1), y.detach())
        assert torch.equal(pact_fake_quantize(x, a, 4, True),
                           pact_fake_quantize_reference(x, a, 4, True))  # fmt: skip
        assert torch.equal(lsqplus_fake_quantize(x, s, a, 0, 15, 0.1),
                           lsqplus_fake_quantize_reference(x, s, a, 0, 15, 0.1))  # fmt: skip


@pytest.mark.parametrize("learn", ["lsq", "lsqplus", "pact"])
def test_quantizer_module_equals_composite(learn):
    """A calibrated activation Quantizer (fused path) vs the composite formula it replaced."""
    x = x_data((8, 17, 32), seed=6)
    q = Quantizer(4, symmetric=learn == "lsq", learn=learn).double()
    q.start_observe()
    q(x)
    q.finish_observe()
    g = 1 / (17 * 32 * max(q.q_max, 1)) ** 0.5
    upstream = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    params = list(q.parameters())
    xl = leaf(x)
    out = q(xl)
    g1 = torch.autograd.grad(out, [xl, *params], upstream)
    xl2 = leaf(x)
    if learn == "pact":
        ref = pact_fake_quantize_reference(xl2, q.alpha, q.bits, q.signed)
    elif learn == "lsq":
        s = q.scale.abs().clamp(min=MIN_SCALE)
        ref = lsq_fake_quantize_reference(xl2, s, q.q_min, q.q_max, g, q.zero_point)
    else:
        s = q.scale.abs().clamp(min=MIN_SCALE)
        ref = lsqplus_fake_quantize_reference(xl2, s, q.offset, q.q_min, q.q_max, g)
    g2 = torch.autograd.grad(ref, [xl2, *params], upstream)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.allclose(g1[0], g2[0], rtol=1e-14, atol=0) and torch.equal(g1[0] == 0,
                                                                            g2[0] == 0)
    for a, b in zip(g1[1:], g2[1:]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_quantized_vit_compiles_without_graph_breaks():
    """``qat.compile``: the fused Functions trace into one graph (aot_eager: no C++ build)."""
    torch._dynamo.reset()
    model = ViT(dim=32, depth=1, heads=2, mlp_dim=64, dropout=0.0)
    quantize_(model, Plan(OpSetting(w_bits=4, a_bits=4)), method="lsq")
    from hawq.quant import calibrate

    calibrate(model, batches(1, bs=4))
    x = batches(1, bs=4, seed=1)[0][0]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ref = model(x)
    out = compiled(x)
    assert torch.allclose(out, ref, atol=1e-5)
    (gr,) = torch.autograd.grad(ref.square().sum(), [model.head.a_quant.scale])
    (gc,) = torch.autograd.grad(out.square().sum(), [model.head.a_quant.scale])
    assert torch.allclose(gr, gc, rtol=1e-4, atol=1e-6)
