"""Float and block formats as fake quantization: FP8, NF4, MXFP4, MXINT8.

All functions map a float tensor to the nearest value representable in the
format (times its scale) and pass the gradient straight through (STE) inside the
representable range.

* **Minifloat** with ``m`` mantissa bits, smallest normal exponent ``e_min`` and
  largest finite value ``v_max``: for ``|y| > 0`` let ``e = max(floor(log2|y|), e_min)``;
  the grid step is ``2^(e - m)`` (subnormals below ``2^e_min``), so
  ``Q(y) = sign(y) * min(round(|y| / 2^(e-m)) * 2^(e-m), v_max)`` (round half to even,
  saturating). FP8 E4M3 (``m=3, e_min=-6, v_max=448``), FP8 E5M2 (``m=2, e_min=-14,
  v_max=57344``), FP4 E2M1 (``m=1, e_min=0, v_max=6``).
* **FP8** with a per-tensor or per-channel scale ``s = amax / v_max``:
  ``x_hat = s * Q(x / s)``.
* **NF4** (QLoRA): 16 levels at normal quantiles normalised to ``[-1, 1]`` (with an
  exact 0), one absmax scale per group: ``x_hat = absmax * L[argmin_i |x/absmax - L_i|]``.
* **MX** (OCP Microscaling spec v1.0): blocks of 32 elements consecutive along the
  reduction dim (the last one zero-padded) share a power-of-two scale
  ``X = 2^(floor(log2 amax) - e_max_elem)`` (E8M0, exponent clamped to [-127, 127]);
  elements are FP4 E2M1 (``e_max_elem = 2``) for MXFP4 or 8-bit two's complement with an
  implicit ``2^-6`` (values ``k/64``, ``|k| <= 127``, ``e_max_elem = 0``) for MXINT8.
"""

from __future__ import annotations

import math

import torch

from hawq.quant.primitives import group_view, reduce_range, ungroup

Tensor = torch.Tensor

#: name -> (mantissa bits, smallest normal exponent, largest finite value)
MINIFLOATS: dict[str, tuple[int, int, float]] = {
    "fp8_e4m3": (3, -6, 448.0),
    "fp8_e5m2": (2, -14, 57344.0),
    "fp4_e2m1": (1, 0, 6.0),
}
#: bits each float format stores per element (for cost models and plan checks)
FORMAT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "nf4": 4, "mxfp4": 4, "mxint8": 8}
MX_BLOCK = 32


def _ste(x: Tensor, x_hat: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Value ``x_hat``; gradient 1 where ``lo <= x <= hi`` (elementwise bounds), else 0."""
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    x_c = torch.clamp(x, lo_t, hi_t)
    return x_hat.detach() + (x_c - x_c.detach())


def round_minifloat(y: Tensor, fmt: str) -> Tensor:
    """Nearest value of minifloat ``fmt`` (round half to even, saturating), no gradient.

    The sign is copied from ``y`` (``-0.0 -> -0.0``), as in an IEEE cast to the format."""
    m, e_min, v_max = MINIFLOATS[fmt]
    a = y.detach().abs().clamp(max=v_max)
    e = torch.floor(torch.log2(a.clamp(min=2.0**e_min))).clamp(min=e_min)
    step = torch.exp2(e - m)
    q = (torch.round(a / step) * step).clamp(max=v_max)
    return torch.copysign(q, y.detach())


def fp8_fake_quantize(
    x: Tensor,
    fmt: str = "fp8_e4m3",
    scale: Tensor | None = None,
    granularity: str = "per_tensor",
    axis: int = 0,
) -> Tensor:
    """FP8 fake quantization ``s * Q(x / s)`` with ``s = amax / v_max`` unless given.

    Args:
        x: input.
        fmt: ``fp8_e4m3`` or ``fp8_e5m2``.
        scale: per-tensor or per-channel scale (broadcastable to ``x``); computed from
            the absmax of ``x`` when None.
        granularity: ``per_tensor`` or ``per_channel`` (used when ``scale`` is None).
        axis: channel axis for ``per_channel``.
    """
    v_max = MINIFLOATS[fmt][2]
    if scale is None:
        scale = fp8_scale(x, fmt, granularity, axis)
    y = x.detach() / scale
    return _ste(x, round_minifloat(y, fmt) * scale, -v_max * scale, v_max * scale)


def fp8_scale(x: Tensor, fmt: str, granularity: str = "per_tensor", axis: int = 0) -> Tensor:
    """``amax / v_max`` per tensor or per channel (a tiny floor keeps it positive)."""
    if granularity == "per_group":
        raise ValueError("FP8 takes a per_tensor or per_channel scale")
    lo, hi = reduce_range(x.detach(), granularity, axis)
    amax = torch.maximum(-lo, hi)
    return torch.clamp(amax / MINIFLOATS[fmt][2], min=1e-12)


def nf4_levels(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The 16 NF4 levels (QLoRA, Dettmers et al. 2023), ascending in [-1, 1].

    8 positive levels at normal quantiles ``Phi^-1(p)`` for ``p`` evenly spaced from
    ``delta = 0.9677083`` down to 1/2 (exclusive), 7 negative levels likewise, plus 0;
    divided by the largest, so that -1, 0 and 1 are exact. ``delta`` is chosen so the
    extreme quantiles stay finite: ``(1 - 1/(2*15) + 1 - 1/(2*16)) / 2``.
    """
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    p_pos = torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    v = v / v.abs().max()
    return torch.sort(v).values.to(device=device, dtype=dtype)


def nf4_fake_quantize(x: Tensor, group_size: int = 64) -> Tensor:
    """NF4 with one absmax scale per group of ``group_size`` (see :func:`group_view`)."""
    xg = group_view(x.detach(), group_size)  # (rows, n_groups, gs)
    absmax = xg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    levels = nf4_levels(x.device, x.dtype)
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(xg / absmax, mids)
    x_hat = ungroup(levels[idx] * absmax, x.shape)
    return _ste(x, x_hat, -math.inf, math.inf)


def mx_blocks(x: Tensor, axis: int = -1, block: int = MX_BLOCK) -> tuple[Tensor, tuple]:
    """``x`` as ``(rows, n_blocks, block)`` with blocks of consecutive elements along
    ``axis`` (the reduction dim); the last block of each row is zero-padded (zeros leave
    a block's ``amax`` unchanged). Returns the blocks and what :func:`mx_unblock` needs."""
    moved = x.movedim(axis, -1)
    n = moved.shape[-1]
    rows = moved.reshape(-1, n)
    pad = (-n) % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, block), (moved.shape, n, axis)


def mx_unblock(xb: Tensor, info: tuple) -> Tensor:
    """Inverse of :func:`mx_blocks`."""
    moved_shape, n, axis = info
    return xb.reshape(xb.shape[0], -1)[:, :n].reshape(moved_shape).movedim(-1, axis)


def mx_fake_quantize(
    x: Tensor, fmt: str = "mxfp4", block: int = MX_BLOCK, axis: int = -1
) -> Tensor:
    """MXFP4 / MXINT8: shared power-of-two scale per ``block`` elements, OCP MX v1.0.

    Blocks run along ``axis``, the dimension a dot product reduces over (spec section
    6.3: the 32 elements of a block are consecutive in the reduction dim): ``-1`` for a
    Linear weight ``(out, in)``, a Linear input ``(..., in)`` and the left operand of
    ``a @ b``; ``-2`` for the right operand ``b`` (``k^T`` in ``q @ k^T``, ``v`` in
    ``p @ v``); ``1`` for a conv weight ``(out, in, kh, kw)`` and its input ``(N, C, H, W)``.
    A reduction length that is not a multiple of 32 ends in a shorter (zero-padded) block.
    """
    xg, info = mx_blocks(x.detach(), axis, block)  # (rows, n_blocks, block)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    e_max_elem = 2 if fmt == "mxfp4" else 0
    shared = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - e_max_elem
    scale = torch.exp2(shared.clamp(-127, 127))
    p = xg / scale
    if fmt == "mxfp4":
        p_hat = round_minifloat(p, "fp4_e2m1")
        bound = 6.0
    elif fmt == "mxint8":
        p_hat = torch.clamp(torch.round(p * 64), -127, 127) / 64
        bound = 127 / 64
    else:
        raise ValueError(f"unknown MX format {fmt!r}")
    x_hat = mx_unblock(p_hat * scale, info)
    lim = mx_unblock((bound * scale).expand_as(xg), info)
    return _ste(x, x_hat, -lim, lim)


def format_fake_quantize(
    x: Tensor,
    fmt: str,
    scale: Tensor | None = None,
    granularity: str = "per_tensor",
    axis: int = 0,
    group_size: int = 64,
    block_axis: int = -1,
) -> Tensor:
    """Dispatch a float format by name (``fp8_e4m3``, ``fp8_e5m2``, ``nf4``, ``mxfp4``, ``mxint8``).

    ``scale`` and ``granularity`` apply to FP8 only; NF4 uses ``group_size`` groups, MX its
    fixed 32-element blocks along ``block_axis`` (the operand's reduction dim).
    """
    if fmt.startswith("fp8"):
        gran = "per_tensor" if granularity == "per_group" else granularity
        return fp8_fake_quantize(x, fmt, scale, gran, axis)
    if fmt == "nf4":
        return nf4_fake_quantize(x, group_size)
    if fmt in ("mxfp4", "mxint8"):
        return mx_fake_quantize(x, fmt, axis=block_axis)
    raise ValueError(f"unknown float format {fmt!r}")
