"""Uniform (integer-grid) quantization as pure functions.

Notation: ``b`` bits, integer range ``[q_min, q_max]``, scale ``s > 0`` and zero
point ``z`` (an integer, or 0.5 for the 1-bit sign grid)::

    quantize:      q = clamp(round(x / s) + z, q_min, q_max)
    dequantize:    x_hat = (q - z) * s
    fake_quantize: x_hat = dequantize(quantize(x))      (float in, float out)

Schemes (:func:`choose_qparams` from a range ``[lo, hi]``, always widened to contain 0):

* symmetric, signed:   ``[q_min, q_max] = [-2^(b-1), 2^(b-1)-1]``, ``z = 0``,
  ``s = max(|lo|, |hi|) / ((q_max - q_min) / 2)`` (the full range covers ``[-max, max]``
  to within ``s/2``);
* symmetric, unsigned: ``[0, 2^b - 1]``, ``z = 0``, ``s = hi / q_max`` (e.g. after ReLU);
* asymmetric (affine): ``s = (hi - lo) / (q_max - q_min)``,
  ``z = round(q_min - lo / s)`` so that 0 is exactly representable;
* 1-bit symmetric (sign): grid ``{-s/2, +s/2}`` written as ``q in {0, 1}``, ``z = 1/2``,
  ``s = max|x|``.

Granularity: ``per_tensor`` (one scale), ``per_channel`` (one per index of ``axis``,
the output channel for weights), ``per_group`` (one per ``group_size`` consecutive
elements of each row of ``x.reshape(x.shape[0], -1)``, i.e. along the input dim of a
Linear/Conv weight; rows are zero-padded to a multiple of ``group_size``).

Straight-through estimator (STE): :func:`fake_quantize` passes the gradient with
respect to ``x`` unchanged where ``x`` lies inside the clipping range
``[(q_min - z) s, (q_max - z) s]`` and zero outside.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
EPS = 1e-8  # smallest scale: keeps a constant (e.g. all-zero) tensor finite


def qrange(bits: int, symmetric: bool = True, signed: bool | None = None) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``bits``-bit grid.

    Args:
        bits: 1-8 (1 with ``symmetric`` is the sign grid ``{0, 1}`` with ``z = 1/2``).
        symmetric: symmetric grids are signed by default, asymmetric ones unsigned.
        signed: override the signedness.
    """
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"bits={bits} out of range 1-16")
    if signed is None:
        signed = symmetric
    if bits == 1 or not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


# ---------------------------------------------------------------- granularity views


def group_view(x: Tensor, group_size: int) -> Tensor:
    """``x`` as ``(rows, n_groups, group_size)`` with rows = ``x.shape[0]``; zero-padded."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    pad = (-rows.shape[1]) % group_size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, group_size)


def ungroup(xg: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`group_view` for a tensor of the original ``shape``."""
    n = 1
    for d in shape:
        n *= d
    rows = shape[0] if len(shape) > 1 else 1
    return xg.reshape(rows, -1)[:, : n // rows].reshape(shape)


def reduce_range(
    x: Tensor, granularity: str = "per_tensor", axis: int = 0, group_size: int = 128
) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` per quantization group.

    Returns tensors broadcastable against ``x`` (per-tensor: 0-d; per-channel: size
    ``x.shape[axis]`` at ``axis`` and 1 elsewhere) or, for ``per_group``, against
    :func:`group_view` ``(x)`` with shape ``(rows, n_groups, 1)``.
    """
    if granularity == "per_tensor":
        return torch.aminmax(x)  # one pass
    if granularity == "per_channel":
        axis = axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    if granularity == "per_group":
        xg = group_view(x, group_size)
        return xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    raise ValueError(f"granularity={granularity!r}; allowed: {GRANULARITIES}")


# ---------------------------------------------------------------- qparams and grid maps


def choose_qparams(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool = True, signed: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (widened to contain 0).

    Returns:
        ``(scale, zero_point)`` with the shape of ``lo``; ``zero_point`` is float-valued
        but integer (0.5 for the 1-bit sign grid).
    """
    q_min, q_max = qrange(bits, symmetric, signed)
    lo = torch.clamp(lo.detach(), max=0.0)
    hi = torch.clamp(hi.detach(), min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        if bits == 1:  # sign grid {-s/2, +s/2}
            return torch.clamp(amax, min=EPS), torch.full_like(amax, 0.5)
        if q_min < 0:
            scale = amax / ((q_max - q_min) / 2)
        else:
            scale = hi / q_max
        return torch.clamp(scale, min=EPS), torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (q_max - q_min), min=EPS)
    zero_point = torch.clamp(torch.round(q_min - lo / scale), q_min, q_max)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, q_min: int, q_max: int) -> Tensor:
    """Integer codes ``clamp(round(x / s) + z, q_min, q_max)`` (float dtype, no gradient)."""
    return torch.clamp(torch.round(x / scale + zero_point), q_min, q_max)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(q - z) * s``."""
    return (q - zero_point) * scale


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return torch.round(x).detach() + (x - x.detach())  # forward value exactly round(x)


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Value ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def fake_quantize_reference(
    x: Tensor, scale: Tensor, zero_point: Tensor, q_min: int, q_max: int
) -> Tensor:
    """Composite (autograd-traced) :func:`fake_quantize`: the reference the fused one equals."""
    scale, zero_point = scale.detach(), zero_point.detach()
    lo = (q_min - zero_point) * scale
    hi = (q_max - zero_point) * scale
    x_c = torch.clamp(x, lo, hi)  # gradient 1 on [lo, hi] inclusive
    x_hat = dequantize(quantize(x.detach(), scale, zero_point, q_min, q_max), scale, zero_point)
    return x_hat + (x_c - x_c.detach())  # forward value exactly x_hat


def _fake_quantize_forward(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, q_min: int, q_max: int
) -> Tensor:
    q = x / scale if zero_point is None else (x / scale).add_(zero_point)
    q = q.round_().clamp_(q_min, q_max)
    return (q if zero_point is None else q.sub_(zero_point)).mul_(scale)


class FakeQuantizeSTE(torch.autograd.Function):
    """Fused :func:`fake_quantize`: output and STE mask in one forward, one backward pass.

    Forward ``x_hat = (clamp(round(x / s + z), q_min, q_max) - z) s`` (in-place chain on one
    buffer; without a graph :func:`fake_quantize` runs just this) and the boolean mask
    ``m = [(q_min - z) s <= x <= (q_max - z) s]``; backward ``dL/dx = m * dL/dx_hat``.
    ``scale``/``zero_point`` are constants (no gradient); ``zero_point=None`` means 0.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, q_min: int, q_max: int
    ) -> Tensor:
        lo = q_min * scale if zero_point is None else (q_min - zero_point) * scale
        hi = q_max * scale if zero_point is None else (q_max - zero_point) * scale
        x_c = torch.clamp(x, lo, hi)
        if torch.compiler.is_compiling():
            mask = (x_c == x).to(x.dtype)
        else:  # 0./1. in x's dtype: bool x float products are slow on CPU
            mask = torch.eq(x_c, x, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        ctx.save_for_backward(mask)
        return _fake_quantize_forward(x, scale, zero_point, q_min, q_max)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, q_min: int, q_max: int
) -> Tensor:
    """``dequantize(quantize(x))`` with the STE for ``x`` (fused, see :class:`FakeQuantizeSTE`).

    Gradient: ``d x_hat / d x = 1`` if ``(q_min - z) s <= x <= (q_max - z) s`` else 0.
    ``scale`` and ``zero_point`` are treated as constants (see :mod:`hawq.quant.learnable`
    for learned ones); ``zero_point=None`` stands for an all-zero zero point.
    """
    z = None if zero_point is None else zero_point.detach()
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _fake_quantize_forward(x, scale.detach(), z, q_min, q_max)
    return FakeQuantizeSTE.apply(x, scale.detach(), z, q_min, q_max)


def fake_quantize_grouped(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    q_min: int,
    q_max: int,
    granularity: str,
    group_size: int = 128,
) -> Tensor:
    """:func:`fake_quantize` where qparams come from :func:`reduce_range` of the same layout."""
    if granularity != "per_group":
        return fake_quantize(x, scale, zero_point, q_min, q_max)
    xg = group_view(x, group_size)
    return ungroup(fake_quantize(xg, scale, zero_point, q_min, q_max), x.shape)


def fake_quantize_tensor(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "per_tensor",
    group_size: int = 128,
    axis: int = 0,
) -> Tensor:
    """Min/max fake quantization of ``x`` at ``bits`` in one call (STE gradient).

    The range of each group is its own ``[min, max]`` (dynamic min/max); used e.g.
    for the quantization error ``||Q_b(W) - W||^2`` of an allocation objective.

    Args:
        x: any tensor.
        bits: 1-8.
        symmetric: symmetric signed grid (zero point 0) or affine with zero point.
        granularity: ``per_tensor``, ``per_channel`` (along ``axis``) or ``per_group``.
        group_size: elements per group for ``per_group``.
        axis: channel axis for ``per_channel``.

    Returns:
        ``Q_b(x)`` with the shape and dtype of ``x``.
    """
    lo, hi = reduce_range(x.detach(), granularity, axis, group_size)
    scale, zero_point = choose_qparams(lo, hi, bits, symmetric)
    q_min, q_max = qrange(bits, symmetric)
    return fake_quantize_grouped(x, scale, zero_point, q_min, q_max, granularity, group_size)
