"""LSQ / LSQ+ / PACT gradients against their closed forms (float64)."""

import math

import pytest
import torch

from hawq.quant.learnable import (
    lsq_fake_quantize,
    lsq_grad_scale,
    lsqplus_fake_quantize,
    pact_fake_quantize,
)
from hawq.quant.primitives import qrange


def data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 2).requires_grad_(True)


@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (4, True), (3, False), (8, False)])
def test_lsq_gradients(bits, symmetric):
    x = data()
    q_min, q_max = qrange(bits, symmetric)
    z = 0.0 if symmetric else float(q_min + (q_max - q_min) // 2)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    g = lsq_grad_scale(x.numel(), q_max)
    assert g == 1 / math.sqrt(x.numel() * q_max)
    lsq_fake_quantize(x, s, q_min, q_max, g, z).sum().backward()
    v = x.detach() / s.detach() + z
    inside = (v >= q_min) & (v <= q_max)
    ds = torch.where(inside, torch.round(v) - v, torch.where(v < q_min, q_min - z, q_max - z))
    assert torch.allclose(s.grad, g * ds.sum(), rtol=1e-10)
    assert torch.equal(x.grad, inside.double())


def test_lsqplus_gradients():
    x = data(seed=1)
    q_min, q_max = qrange(4, False)
    s = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    g = lsq_grad_scale(x.numel(), q_max)
    y = lsqplus_fake_quantize(x, s, beta, q_min, q_max, g)
    y.sum().backward()
    v = (x.detach() - beta.detach()) / s.detach()
    inside = (v >= q_min) & (v <= q_max)
    ds = torch.where(inside, torch.round(v) - v, torch.where(v < q_min, q_min, q_max) * 1.0)
    assert torch.allclose(s.grad, g * ds.sum(), rtol=1e-10)
    assert torch.allclose(beta.grad, g * (~inside).double().sum(), rtol=1e-10)
    assert torch.equal(x.grad, inside.double())
    # forward: on the grid beta + k s
    k = (y.detach() - beta.detach()) / s.detach()
    assert torch.allclose(k, k.round()) and k.min() >= q_min and k.max() <= q_max


@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients_and_gradcheck(signed):
    x = data(seed=2)
    alpha = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    y = pact_fake_quantize(x, alpha, 4, signed)
    y.sum().backward()
    xd = x.detach()
    above = (xd >= 1.7).double().sum()
    below = (xd <= -1.7).double().sum() if signed else 0.0
    assert torch.allclose(alpha.grad, above - below)
    lower = -1.7 if signed else 0.0
    assert torch.equal(x.grad, ((xd > lower) & (xd < 1.7)).double())
    # the STE surrogate (the clip) is differentiable a.e.: float64 gradcheck in x and alpha
    def clip(x_, a_):
        lo = -a_ if signed else torch.zeros_like(a_)
        return torch.minimum(torch.maximum(x_, lo), a_)

    xs = torch.tensor([-2.5, -0.7, 0.3, 1.1, 2.4], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip, (xs, a))
    ys = pact_fake_quantize(xs, a, 4, signed)
    gx, ga = torch.autograd.grad(ys.sum(), (xs, a))
    cx, ca = torch.autograd.grad(clip(xs, a).sum(), (xs, a))
    assert torch.equal(gx, cx) and torch.equal(ga, ca)
    n = 2**3 - 1 if signed else 2**4 - 1
    codes = ys.detach() / (1.7 / n)
    assert torch.allclose(codes, codes.round())


def test_lsq_gradcheck_where_round_is_frozen():
    """With round(v) held fixed, LSQ's STE gradient is the exact derivative of the surrogate."""
    x = torch.tensor([-3.0, -0.4, 0.1, 0.77, 5.0], dtype=torch.float64)
    q_min, q_max = -8, 7

    s0 = 0.21
    v0 = torch.clamp(x / s0, q_min, q_max)
    offset = v0.round() - v0  # round(v) - v frozen at s0: round acts as identity nearby

    def surrogate(s):
        return (torch.clamp(x / s, q_min, q_max) + offset) * s

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(surrogate, (s,))
    (g1,) = torch.autograd.grad(surrogate(s).sum(), s)
    (g2,) = torch.autograd.grad(lsq_fake_quantize(x, s, q_min, q_max).sum(), s)
    assert torch.allclose(g1, g2)


def test_step_gradient_under_bf16_is_fast_and_accurate():
    """The per-tensor step-size gradient sum(grad * e) of bf16 tensors (QAT under CPU bf16
    autocast) uses a float32 accumulator, not torch's scalar bf16 ``dot`` (~40x slower)."""
    import time

    from hawq.quant.learnable import _weighted_sum_to

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1 << 20, generator=g).to(torch.bfloat16)
    b = torch.randn(1 << 20, generator=g).to(torch.bfloat16)
    ref = float((a.double() * b.double()).sum())
    got = _weighted_sum_to(a, b, torch.Size([]))
    assert got.dtype == torch.bfloat16 and got.shape == ()
    assert abs(float(got) - ref) <= 0.01 * abs(ref) + 8.0  # bf16 output: 8 bits at ~1000

    def best(fn) -> float:
        out = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    assert best(lambda: _weighted_sum_to(a, b, torch.Size([]))) < best(lambda: torch.dot(a, b))
