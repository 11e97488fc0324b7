"""The seed study's dynamic asymmetric min/max quantizer, bit-exact with its formulas.

The seed study (``vit-cifar10-int4-int2-study.md``, section 1.2.1.1) quantizes each
operand of each matrix op per tensor, per call, on the unsigned grid ``0..2^n - 1``::

    q_max = 2^n - 1,  q_min = 0
    s = (r_max - r_min) / (q_max - q_min)
    z = round(q_max - r_max / s)
    q = round(r / s + z)                 (codes; clamped to [0, q_max], see below)
    r_hat = s (q - z)

with ``r_min, r_max`` the operand's own minimum and maximum. Unlike
:func:`hawq.quant.primitives.choose_qparams` the range is *not* widened to contain 0 and
the zero point is *not* clamped into the grid: for a softmax operand (``r_min > 0``) the
whole grid spans ``[r_min, r_max]`` and ``z`` is negative.

Codes: for ``r`` in ``[r_min, r_max]``, ``r/s + z`` lies in ``[d, q_max + d]`` with
``|d| <= 1/2`` (the rounding of ``z``), so rounding gives ``0..q_max`` except at an exact
``.5`` tie at an end point; the clamp to ``[0, q_max]`` (the stated code range) only acts
there.

Constant tensors (``r_max == r_min``, all-zero included): the formula divides by
``s = 0``. We take its limit ``s -> 0`` (the error bound ``s/2`` goes to 0): the tensor
passes through unchanged (``r_hat = r`` exactly), every code is ``q_max`` (where ``r_max``
always lands), ``s = 0`` and ``z = q_max`` are reported.

Gradient: the seed's ``ste_round`` (identity for ``r``, ``s`` and ``z`` detached), so the
function can also run inside QAT.

Granularity: the formulas apply per tensor (the seed) or elementwise per channel / group
(ranges from :func:`~hawq.quant.primitives.reduce_range`).
"""

from __future__ import annotations

import torch

from hawq.quant.primitives import _fake_quantize_forward, group_view, reduce_range, ungroup

Tensor = torch.Tensor


def exact_minmax_qparams(lo: Tensor, hi: Tensor, q_max: int) -> tuple[Tensor, Tensor]:
    """``s = (r_max - r_min) / q_max`` and ``z = round(q_max - r_max / s)``.

    Returns ``(s, z)``; where ``r_max == r_min``: ``s = 0``, ``z = q_max``.
    """
    lo, hi = lo.detach(), hi.detach()
    scale = (hi - lo) / q_max
    ok = scale > 0
    safe = torch.where(ok, scale, torch.ones_like(scale))
    zero = torch.where(ok, torch.round(q_max - hi / safe), torch.full_like(scale, q_max))
    return scale, zero


def exact_minmax_codes(x: Tensor, scale: Tensor, zero: Tensor, q_max: int) -> Tensor:
    """``clamp(round(r / s + z), 0, q_max)`` (float dtype); ``q_max`` where ``s = 0``."""
    ok = scale > 0
    safe = torch.where(ok, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x.detach() / safe + zero), 0, q_max)
    return torch.where(ok, q, torch.full_like(q, q_max))


def exact_minmax_dequantize(q: Tensor, scale: Tensor, zero: Tensor, x: Tensor) -> Tensor:
    """``s (q - z)``; the input ``x`` itself where ``s = 0`` (constant tensor)."""
    return torch.where(scale > 0, scale * (q - zero), x.detach())


def exact_minmax_fake_quantize(
    x: Tensor,
    q_max: int,
    granularity: str = "per_tensor",
    axis: int = 0,
    group_size: int = 128,
) -> Tensor:
    """``r_hat`` of the module docstring, ranges from ``x`` itself (dynamic), STE gradient.

    Args:
        x: the operand.
        q_max: ``2^n - 1``.
        granularity: ``per_tensor`` (the seed), ``per_channel`` (along ``axis``) or
            ``per_group`` (``group_size`` consecutive elements of each row).
    """
    xv = group_view(x, group_size) if granularity == "per_group" else x
    with torch.no_grad():
        if granularity == "per_group":  # (rows, groups, group_size): one range per group
            lo, hi = xv.amin(dim=-1, keepdim=True), xv.amax(dim=-1, keepdim=True)
        else:
            lo, hi = reduce_range(xv.detach(), granularity, axis)
        scale, zero = exact_minmax_qparams(lo, hi, q_max)
        if bool((scale > 0).all()):  # one in-place chain: ((x/s + z).round().clamp() - z) s
            x_hat = _fake_quantize_forward(xv.detach(), scale, zero, 0, q_max)
        else:  # some constant slice: the defined pass-through
            x_hat = exact_minmax_dequantize(
                exact_minmax_codes(xv, scale, zero, q_max), scale, zero, xv
            )
        if granularity == "per_group":
            x_hat = ungroup(x_hat, x.shape)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x_hat
    return x_hat + (x - x.detach())  # value exactly x_hat (adding +-0), gradient 1
