"""Integer-only LayerNorm with an integer square root by Newton iteration (I-BERT Sec. 3.6).

Input: codes ``q`` (last dimension ``D``) of ``x = S q``. Output: codes on the grid of the
consumer, ``(s_out, z, [lo, hi])``. With ``f`` fractional bits of the mean, a precision
shift ``t`` and output fraction ``k``::

    mu   = round(2^f sum q / D)                    c = 2^f q - mu     (the mean to 2^-f code)
    v    = 2^(2t) floor(sum c^2 / D) + round(eps 2^(2t+2f) / S^2)
    r    = isqrt(v)                                 (r ~= 2^(t+f) sigma / S)
    y    = round(c 2^(t+k) / r)                     (y ~= 2^k (x - mean) / sigma)
    out  = clamp(rshift_round(y M_c + B_c, E_c) + z, lo, hi)

with per-channel dyadic ``M_c 2^-E_c ~= gamma_c 2^-k / s_out`` and
``B_c = round(beta_c 2^E_c / s_out)``. The scale ``S`` cancels in ``c / r``: only ``eps``
depends on it. ``isqrt`` is Newton's ``r <- floor((r + floor(v / r)) / 2)`` from a start
above the root, which decreases monotonically to ``floor(sqrt v)``.

Bounds: with ``|c| < 2^(C+f)`` (``C`` = input bits + 1): ``sum c^2 < D 2^(2(C+f)) < 2^62``,
``v < 2^(2(C+f+t)) < 2^62`` and ``c 2^(t+k+1) < 2^63`` fix ``f <= 8`` and ``t <= 8``
(:func:`precision_shift`); ``|y| <= sqrt(D) 2^k``.

Error of ``y`` against ``2^k (q - mean) / sigma`` (``sigma`` in codes, :func:`error_bound`):
the mean is off by ``delta <= 2^-(f+1)`` code, which shifts every centred value by
``delta`` and the variance by ``delta^2``; the floors of ``v`` and of ``isqrt`` and the
rounding of ``eps`` make ``r`` relatively ``<= 2 / r + 1 / v`` low; the final rounding adds
1/2. (Before ``f`` the mean was rounded to a whole code: an error of up to ``2^k / (2 sigma)``,
large for a residual stream of 8 bits, where ``sigma`` is a few codes.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.integer.dyadic import dyadic, rshift_round

Tensor = torch.Tensor

FRAC_BITS = 16  # k
MAX_T = 8
MAX_E = 40  # caps B_c = beta 2^E / s_out


NEWTON_STEPS = 8  # from a start within 2x of the root: 6 reach floor(sqrt v) for v < 2^62


def bit_length(v: Tensor) -> Tensor:
    """``floor(log2 v) + 1`` (0 for 0) of non-negative int64 ``v``: a binary search with
    shifts, six fixed steps."""
    n = torch.zeros_like(v)
    for s in (32, 16, 8, 4, 2, 1):
        big = torch.bitwise_right_shift(v, s) > 0
        v = torch.where(big, torch.bitwise_right_shift(v, s), v)
        n = n + big.to(n.dtype) * s
    return n + (v > 0).to(n.dtype)


def isqrt(v: Tensor, iters: int = NEWTON_STEPS) -> Tensor:
    """``floor(sqrt(v))`` of non-negative int64 ``v <= 2^62`` by integer Newton iteration.

    The start ``r_0 = 2^ceil(b/2)`` (``b`` = bit length of ``v``) satisfies
    ``sqrt(v) <= r_0 < 2 sqrt(v)``; Newton's relative error then falls as
    ``e' = e^2 / (2 (1 + e))``: 1 -> 0.25 -> 0.025 -> 3e-4 -> 5e-8 -> 1e-15, below one unit
    of a 31-bit root after five steps, and the floored iteration, never below
    ``floor(sqrt v)``, lands on it at the sixth. A fixed step count (no data-dependent exit)
    keeps the GPU free of host syncs and the graph whole under ``torch.compile``.
    """
    v = v.to(torch.int64)
    half_bits = torch.div(bit_length(v) + 1, 2, rounding_mode="floor")  # ceil(b / 2)
    r = torch.bitwise_left_shift(torch.ones_like(v), half_bits)
    for _ in range(iters):
        nxt = torch.bitwise_right_shift(r + torch.div(v, r, rounding_mode="floor"), 1)
        r = torch.minimum(torch.clamp(nxt, min=1), r)  # v = 0 would reach 0: fixed up below
    return torch.where(v == 0, torch.zeros_like(r), r)


MAX_F = 8  # fractional bits of the mean


def precision_shift(dim: int, in_bits: int) -> tuple[int, int]:
    """``(f, t)``: mean fraction bits and precision shift within the module docstring's bounds
    (``D 2^(2(C+f)) < 2^62``, ``2(C+f+t) <= 61``, ``C+f+t+k+1 <= 62``; each at most 8)."""
    c = in_bits + 1
    f = min(MAX_F, (61 - math.ceil(math.log2(max(dim, 2)))) // 2 - c)
    if f < 0:
        raise OverflowError(f"IntLayerNorm: D={dim} at {in_bits} input bits overflows int64")
    t = min(MAX_T, 61 // 2 - c - f, 62 - c - f - FRAC_BITS - 1)
    if t < 0:
        raise OverflowError(f"IntLayerNorm: {in_bits} input bits leave no precision bits")
    return f, t


def error_bound(
    c: Tensor, sigma: Tensor, r: Tensor, v: Tensor, f: int, k: int = FRAC_BITS
) -> Tensor:
    """Bound on ``|y - 2^k (q - mean) / sigma|`` (module docstring): with
    ``delta = 2^-(f+1)``, ``rho = delta^2 / sigma^2 + 2 / r + 1 / v``::

        0.5 + 2^k (delta / sigma + (|c| / sigma) rho / (1 - rho))

    Args:
        c: exact centred codes ``q - mean`` (float64); sigma: exact std in codes;
        r, v: the integer root and radicand of the row.
    """
    delta = 2.0 ** -(f + 1)
    rho = delta**2 / sigma**2 + 2.0 / r + 1.0 / v
    return 0.5 + 2.0**k * (delta / sigma + c.abs() / sigma * rho / (1 - rho))


class IntLayerNorm(nn.Module):
    """LayerNorm over the last dimension, integer in and integer out.

    Args:
        weight, bias: the float ``gamma``, ``beta`` (``D``,).
        eps: the LayerNorm epsilon.
        in_scale: scale ``S`` of the input codes.
        in_bits: the input codes satisfy ``|q| < 2^(in_bits - 1)``.
        out_scale, out_zero, out_lo, out_hi: the output grid (the consumer's input grid).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        eps: float,
        in_scale: float,
        in_bits: int,
        out_scale: float,
        out_zero: int,
        out_lo: int,
        out_hi: int,
    ) -> None:
        super().__init__()
        d = weight.numel()
        self.f, self.t = precision_shift(d, in_bits)
        self.k = FRAC_BITS
        eps_q = round(eps * 4.0 ** (self.t + self.f) / (in_scale * in_scale))
        m, e = dyadic(weight.detach().double().cpu() * 2.0**-self.k / out_scale, max_shift=MAX_E)
        b = torch.round(bias.detach().double().cpu() * torch.pow(2.0, e.double()) / out_scale)
        if b.abs().max() >= 2**61:
            raise OverflowError("IntLayerNorm: beta / s_out too large for int64")
        self.register_buffer("m", m)
        self.register_buffer("e", e)
        self.register_buffer("b", b.to(torch.int64))
        self.register_buffer("eps_q", torch.tensor(eps_q, dtype=torch.int64))
        self.register_buffer("z", torch.tensor(int(out_zero), dtype=torch.int64))
        self.out_lo, self.out_hi = int(out_lo), int(out_hi)
        self.out_dtype = torch.int8 if -128 <= out_lo and out_hi <= 127 else torch.int32
        self.dim, self.in_scale, self.out_scale = d, float(in_scale), float(out_scale)

    def stats(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c, v, r)`` of the module docstring (int64; ``v, r`` per row)."""
        q = q.to(torch.int64)
        d = self.dim
        s = torch.bitwise_left_shift(q.sum(-1, keepdim=True), self.f + 1)
        mu = torch.div(s + d, 2 * d, rounding_mode="floor")  # round(2^f sum / D), half up
        c = torch.bitwise_left_shift(q, self.f) - mu
        v = (
            torch.bitwise_left_shift(
                torch.div((c * c).sum(-1, keepdim=True), d, rounding_mode="floor"), 2 * self.t
            )
            + self.eps_q
        )
        r = torch.clamp(isqrt(v), min=1)  # v = 0 only for a constant row with eps = 0
        return c, v, r

    def normalize(self, q: Tensor) -> Tensor:
        """``y ~= 2^k (x - mean) / sigma`` (int64)."""
        c, _, r = self.stats(q)
        num = torch.bitwise_left_shift(c, self.t + self.k + 1)
        return torch.div(num + r, 2 * r, rounding_mode="floor")  # round(c 2^(t+k) / r)

    def forward(self, q: Tensor) -> Tensor:
        from hawq.integer import ops

        if ops.resolve(q) == "cpu" and q.dtype in (torch.int8, torch.int32, torch.int64):
            from hawq.integer import cpu

            return cpu.ext().layernorm(
                q,
                self.f,
                self.t,
                self.k,
                int(self.eps_q),
                self.m,
                self.e,
                self.b,
                int(self.z),
                self.out_lo,
                self.out_hi,
                NEWTON_STEPS,
                self.out_dtype,
            )
        y = self.normalize(q)
        out = rshift_round(y * self.m + self.b, self.e) + self.z
        return torch.clamp(out, self.out_lo, self.out_hi).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, f={self.f}, t={self.t}, k={self.k}, out_scale={self.out_scale:.4g}"
