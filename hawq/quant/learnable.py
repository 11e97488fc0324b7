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
"""

from __future__ import annotations

import math

import torch

from hawq.quant.primitives import grad_scale, round_ste

Tensor = torch.Tensor


def lsq_grad_scale(n_elements: int, q_max: int) -> float:
    """``g = 1 / sqrt(N * Q_p)`` (Q_p at least 1)."""
    return 1.0 / math.sqrt(max(n_elements, 1) * max(q_max, 1))


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    q_min: int,
    q_max: int,
    g: float = 1.0,
    zero_point: Tensor | float = 0.0,
) -> Tensor:
    """LSQ: ``(round(clamp(x/s + z, q_min, q_max)) - z) * s`` with gradients to ``x`` and ``s``.

    Args:
        x: input.
        scale: learned step size(s), broadcastable to ``x`` (kept positive by the caller).
        q_min, q_max: integer range.
        g: gradient scale of ``scale``.
        zero_point: fixed zero point (not learned), broadcastable to ``x``.
    """
    s = grad_scale(scale, g)
    z = zero_point.detach() if isinstance(zero_point, Tensor) else zero_point
    v = torch.clamp(x / s + z, q_min, q_max)
    return (round_ste(v) - z) * s


def lsqplus_fake_quantize(
    x: Tensor, scale: Tensor, offset: Tensor, q_min: int, q_max: int, g: float = 1.0
) -> Tensor:
    """LSQ+: ``round(clamp((x - beta)/s, q_min, q_max)) * s + beta``; ``s`` and ``beta`` learned."""
    s = grad_scale(scale, g)
    beta = grad_scale(offset, g)
    v = torch.clamp((x - beta) / s, q_min, q_max)
    return round_ste(v) * s + beta


def pact_fake_quantize(x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """PACT: clip to ``[0, alpha]`` (``[-alpha, alpha]`` if ``signed``), quantize, STE.

    The forward value is ``round(y / s) * s`` with ``y`` the clipped input and ``s = alpha/n``;
    the gradient is that of ``y`` (the paper's STE), i.e. 1 to ``x`` inside the clip and
    ``+-1`` to ``alpha`` outside.
    """
    lower = -alpha if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, lower), alpha)
    n = (2 ** (bits - 1) - 1 if signed else 2**bits - 1) if bits > 1 else 1
    s = (alpha / n).detach()
    y_hat = torch.round(y.detach() / s) * s
    return y_hat + (y - y.detach())
