"""Learned quantizer parameters: LSQ, LSQ+ and PACT (functional forms).

Notation: ``v = x / s`` (LSQ) or ``v = (x - beta) / s`` (LSQ+), integer range
``[q_min, q_max]``, ``R = round(clamp(v, q_min, q_max))``; ``Q_p = q_max``.

* **LSQ** (Esser et al. 2020): ``x_hat = (R - z) s`` with a fixed zero point ``z``
  (0 for symmetric). Gradients (STE for ``round``)::

      d x_hat / d x = 1 if q_min <= v <= q_max else 0        (v = x/s + z)
      d x_hat / d s = (R - v)       if q_min <= v <= q_max
                      (q_min - z)   if v < q_min
                      (q_max - z)   if v > q_max

  and the step-size gradient is scaled by ``g = 1 / sqrt(N * Q_p)`` (``N`` = number of
  elements the step size covers) via :func:`~hawq.quant.primitives.grad_scale`.
* **LSQ+** (Bhalgat et al. 2020): ``x_hat = R s + beta`` with a learned offset ``beta``;
  ``d x_hat / d beta = 0`` inside the range and 1 outside; ``d/ds`` as LSQ with ``z = 0``.
* **PACT** (Choi et al. 2018): clip to ``[lower, alpha]`` (``lower = 0`` for non-negative
  activations, ``-alpha`` for signed ones), then quantize uniformly with
  ``s = alpha / n`` (``n = 2^b - 1`` unsigned, ``2^(b-1) - 1`` signed), STE for round::

      d y / d alpha = 1 if x >= alpha, -1 if x <= -alpha (signed), else 0.

Implementation: each quantizer kind is one :class:`torch.autograd.Function`
(:class:`LSQFunction`, :class:`LSQPlusFunction`, :class:`PACTFunction`) whose forward
writes the output through an in-place chain on one buffer and keeps a boolean mask,
and whose backward evaluates the closed forms above directly, e.g. for LSQ with
``m`` the in-range mask and ``x_hat`` the (saved) output::

    dL/dx = m * dL/dx_hat
    dL/ds = g / s * sum(dL/dx_hat * (x_hat - m * x))     # = g * sum(dL/dx_hat * ds_elem)

since inside the range ``(x_hat - x) / s = R - v`` and outside ``x_hat / s = R - z``.
The step-size positivity map ``s = max(|s_raw|, s_min)`` (optional) and the gradient
scale ``g`` are applied inside, so one quantizer call is one autograd node. The
``*_reference`` functions are the composite (autograd-traced) forms they replace; the
tests check that both agree in value and every gradient. The backward passes are
first-order only (the masks and saved output are constants), which is all QAT needs;
Hessians are taken of FP models.
"""

from __future__ import annotations

import math

import torch

from hawq.quant.primitives import grad_scale, round_ste

Tensor = torch.Tensor


def lsq_grad_scale(n_elements: int, q_max: int) -> float:
    """``g = 1 / sqrt(N * Q_p)`` (Q_p at least 1)."""
    return 1.0 / math.sqrt(max(n_elements, 1) * max(q_max, 1))


# ---------------------------------------------------------------- helpers


def _positive(scale: Tensor, min_scale: float | None) -> Tensor:
    """``max(|s|, s_min)`` (``s`` itself when ``min_scale`` is None)."""
    return scale if min_scale is None else scale.abs().clamp_(min=min_scale)


def _positive_grad(grad: Tensor, scale: Tensor, min_scale: float | None) -> Tensor:
    """Chain rule through :func:`_positive`: ``sign(s) [|s| >= s_min]`` (as abs/clamp do)."""
    if min_scale is None:
        return grad
    return grad * scale.sign() * (scale.abs() >= min_scale)


def _float_mask(op, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``op(a, b)`` as 0./1. in ``a``'s dtype, written into ``out`` (e.g. a dead buffer of
    the same layout) or a new tensor: one pass, and float masks multiply at full speed
    where bool x float products take a slow type-promotion path (CPU)."""
    if torch.compiler.is_compiling():  # Inductor fuses the cast; dynamo rejects some out=
        return op(a, b).to(a.dtype)
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    return op(a, b, out=out)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dimensions a tensor of ``shape`` was broadcast along."""
    if len(shape) == 0 or math.prod(shape) == 1:
        return t.sum().reshape(shape)
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1
    ]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def _weighted_sum_to(grad: Tensor, e: Tensor, shape: torch.Size) -> Tensor:
    """``sum(grad * e)`` reduced to ``shape``: one fused dot product for a per-tensor qparam.

    Only for float32/float64: torch's CPU ``dot`` on bfloat16 (QAT under bf16 autocast) is a
    scalar loop, ~40x slower than float32 (26 ms for a 2 M-element CPU-ViT activation: 60% of a
    W4A4 QAT step); there the products are summed with a float32 accumulator instead."""
    per_tensor = len(shape) == 0 or math.prod(shape) == 1
    if per_tensor and grad.dtype == e.dtype and grad.dtype in (torch.float32, torch.float64):
        return torch.dot(grad.reshape(-1), e.reshape(-1)).reshape(shape)
    if per_tensor:
        return (grad * e).sum(dtype=torch.float32).to(grad.dtype).reshape(shape)
    return _sum_to(grad * e, shape)


# ---------------------------------------------------------------- LSQ


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _lsq_forward(
    x: Tensor, s: Tensor, z: Tensor | None, q_min: int, q_max: int, with_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """``x_hat`` (in-place chain on one buffer) and the in-range mask ``[r == v]`` (float,
    written over ``v``): two allocations, five or six passes."""
    v = x / s if z is None else (x / s).add_(z)
    r = torch.clamp(v, q_min, q_max)
    mask = _float_mask(torch.eq, r, v, out=v) if with_mask else None
    r = r.round_()
    return (r if z is None else r.sub_(z)).mul_(s), mask


class LSQFunction(torch.autograd.Function):
    """LSQ fake quantization with a fixed zero point as one autograd node.

    Forward: ``s = max(|s_raw|, s_min)``, ``v = x / s + z``, ``m = [q_min <= v <= q_max]``,
    ``x_hat = (round(clamp(v, q_min, q_max)) - z) s``. Backward::

        dL/dx     = m * G
        dL/ds     = g / s * sum(G * (x_hat - m x))
        dL/ds_raw = dL/ds * sign(s_raw) * [|s_raw| >= s_min]

    with ``G = dL/dx_hat``, sums over the elements each step size covers.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        q_min: int,
        q_max: int,
        g: float,
        min_scale: float | None,
    ) -> Tensor:
        s = _positive(scale, min_scale)
        out, mask = _lsq_forward(x, s, zero_point, q_min, q_max, True)
        ctx.save_for_backward(x, out, mask, scale, s)
        ctx.g, ctx.min_scale = g, min_scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, mask, scale, s = ctx.saved_tensors
        gx = grad * mask if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            e = torch.mul(x, mask).neg_().add_(out)  # x_hat - m x = s * ds_elem
            gs = _weighted_sum_to(grad, e, s.shape).to(s.dtype) * (ctx.g / s)
            gs = _positive_grad(gs, scale, ctx.min_scale)
        return gx, gs, None, None, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    q_min: int,
    q_max: int,
    g: float = 1.0,
    zero_point: Tensor | float | None = 0.0,
    min_scale: float | None = None,
) -> Tensor:
    """LSQ: ``(round(clamp(x/s + z, q_min, q_max)) - z) * s`` with gradients to ``x`` and ``s``.

    Args:
        x: input.
        scale: learned step size(s), broadcastable to ``x`` (positive, or made positive
            by ``min_scale``).
        q_min, q_max: integer range.
        g: gradient scale of ``scale``.
        zero_point: fixed zero point (not learned), broadcastable to ``x``; ``0``/None: none.
        min_scale: if set, the step size used is ``max(|scale|, min_scale)`` (with its
            gradient chained back to ``scale``).
    """
    if isinstance(zero_point, Tensor):
        z: Tensor | None = zero_point.detach()
    elif zero_point:
        z = torch.tensor(float(zero_point), dtype=scale.dtype, device=scale.device)
    else:
        z = None
    if not _needs_graph(x, scale):
        return _lsq_forward(x, _positive(scale.detach(), min_scale), z, q_min, q_max, False)[0]
    return LSQFunction.apply(x, scale, z, q_min, q_max, g, min_scale)


def lsq_fake_quantize_reference(
    x: Tensor,
    scale: Tensor,
    q_min: int,
    q_max: int,
    g: float = 1.0,
    zero_point: Tensor | float = 0.0,
) -> Tensor:
    """Composite form of :func:`lsq_fake_quantize` (the reference it is tested against)."""
    s = grad_scale(scale, g)
    z = zero_point.detach() if isinstance(zero_point, Tensor) else zero_point
    v = torch.clamp(x / s + z, q_min, q_max)
    return (round_ste(v) - z) * s


# ---------------------------------------------------------------- LSQ+


def _lsqplus_forward(
    x: Tensor, s: Tensor, beta: Tensor, q_min: int, q_max: int, with_mask: bool
) -> tuple[Tensor, Tensor | None]:
    v = (x - beta).div_(s)
    r = torch.clamp(v, q_min, q_max)
    mask = _float_mask(torch.eq, r, v, out=v) if with_mask else None
    return r.round_().mul_(s).add_(beta), mask


class LSQPlusFunction(torch.autograd.Function):
    """LSQ+ fake quantization (learned step size and offset) as one autograd node.

    Forward: ``v = (x - beta) / s``, ``m = [q_min <= v <= q_max]``,
    ``x_hat = round(clamp(v, q_min, q_max)) s + beta``. Backward::

        dL/dx    = m * G
        dL/ds    = g / s * sum(G * (x_hat - (m ? x : beta)))   # R - v inside, R outside
        dL/dbeta = g * sum((1 - m) * G)
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        scale: Tensor,
        offset: Tensor,
        q_min: int,
        q_max: int,
        g: float,
        min_scale: float | None,
    ) -> Tensor:
        s = _positive(scale, min_scale)
        out, mask = _lsqplus_forward(x, s, offset, q_min, q_max, True)
        ctx.save_for_backward(x, out, mask, scale, s, offset)
        ctx.g, ctx.min_scale = g, min_scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, mask, scale, s, offset = ctx.saved_tensors
        gx = grad * mask if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else None
        gs = gb = None
        if ctx.needs_input_grad[1]:
            e = (x - offset).mul_(mask).neg_().add_(out).sub_(offset)  # m ? x_hat-x : x_hat-beta
            gs = _weighted_sum_to(grad, e, s.shape).to(s.dtype) * (ctx.g / s)
            gs = _positive_grad(gs, scale, ctx.min_scale)
        if ctx.needs_input_grad[2]:
            gb = _sum_to(grad - gx, offset.shape).to(offset.dtype) * ctx.g  # (1 - m) G exactly
        return (gx if ctx.needs_input_grad[0] else None), gs, gb, None, None, None, None


def lsqplus_fake_quantize(
    x: Tensor,
    scale: Tensor,
    offset: Tensor,
    q_min: int,
    q_max: int,
    g: float = 1.0,
    min_scale: float | None = None,
) -> Tensor:
    """LSQ+: ``round(clamp((x - beta)/s, q_min, q_max)) * s + beta``; ``s`` and ``beta`` learned.

    Both gradients are scaled by ``g``; ``min_scale`` as in :func:`lsq_fake_quantize`.
    """
    if not _needs_graph(x, scale, offset):
        s = _positive(scale.detach(), min_scale)
        return _lsqplus_forward(x, s, offset.detach(), q_min, q_max, False)[0]
    return LSQPlusFunction.apply(x, scale, offset, q_min, q_max, g, min_scale)


def lsqplus_fake_quantize_reference(
    x: Tensor, scale: Tensor, offset: Tensor, q_min: int, q_max: int, g: float = 1.0
) -> Tensor:
    """Composite form of :func:`lsqplus_fake_quantize`."""
    s = grad_scale(scale, g)
    beta = grad_scale(offset, g)
    v = torch.clamp((x - beta) / s, q_min, q_max)
    return round_ste(v) * s + beta


# ---------------------------------------------------------------- PACT


def pact_levels(bits: int, signed: bool) -> int:
    """``n``: the clip ``alpha`` is ``n`` steps (``2^(b-1) - 1`` signed, ``2^b - 1`` unsigned)."""
    return (2 ** (bits - 1) - 1 if signed else 2**bits - 1) if bits > 1 else 1


def _pact_forward(x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
    lower = -alpha if signed else torch.zeros_like(alpha)
    s = alpha / pact_levels(bits, signed)
    return torch.clamp(x, lower, alpha).div_(s).round_().mul_(s)


class PACTFunction(torch.autograd.Function):
    """PACT as one autograd node.

    Forward ``y = clamp(x, lower, alpha)``, ``x_hat = round(y / s) s`` with ``s = alpha / n``.
    Backward (the clip's STE)::

        dL/dx     = [lower < x < alpha] * G
        dL/dalpha = sum([x >= alpha] G) - sum([x <= -alpha] G)     (second term if signed)
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        return _pact_forward(x, alpha, bits, signed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha = ctx.saved_tensors
        above = _float_mask(torch.ge, x, alpha)
        below = _float_mask(torch.le, x, -alpha if ctx.signed else torch.zeros_like(alpha))
        gx = grad * torch.add(above, below).neg_().add_(1) if ctx.needs_input_grad[0] else None
        ga = None
        if ctx.needs_input_grad[1]:
            ga = _weighted_sum_to(grad, above, alpha.shape)
            if ctx.signed:
                ga = ga - _weighted_sum_to(grad, below, alpha.shape)
            ga = ga.to(alpha.dtype)
        return gx, ga, None, None


def pact_fake_quantize(x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """PACT: clip to ``[0, alpha]`` (``[-alpha, alpha]`` if ``signed``), quantize, STE.

    The forward value is ``round(y / s) * s`` with ``y`` the clipped input and ``s = alpha/n``;
    the gradient is that of ``y`` (the paper's STE), i.e. 1 to ``x`` strictly inside the
    clip and ``+-1`` to ``alpha`` at or beyond it.
    """
    if not _needs_graph(x, alpha):
        return _pact_forward(x, alpha.detach(), bits, signed)
    return PACTFunction.apply(x, alpha, bits, signed)


def pact_fake_quantize_reference(x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """Composite form of :func:`pact_fake_quantize` (equal except at exact ties ``x = +-alpha``
    or ``x = 0``, where ``minimum``/``maximum`` split the gradient in halves)."""
    lower = -alpha if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, lower), alpha)
    s = (alpha / pact_levels(bits, signed)).detach()
    y_hat = torch.round(y.detach() / s) * s
    return y_hat + (y - y.detach())
