"""Dyadic numbers and integer requantization.

A real multiplier ``s`` (the ratio of an accumulator scale to an output scale) is
replaced by a *dyadic number* ``m * 2^-e`` with an integer mantissa ``m`` and shift
``e >= 0``, so rescaling is an integer multiply and a rounding right shift::

    e = 30 - floor(log2 |s|)          (so 2^30 <= |m| < 2^31: 31 significant bits)
    m = round(s * 2^e)                 |s - m 2^-e| <= 2^-(e+1) <= 2^-31 |s|

    requant(acc) = clamp(rshift_round(acc * m, e) + z, lo, hi)

``rshift_round(v, e)`` is ``round(v / 2^e)`` with **round half to even**, the mode of
``torch.round``, which the fake-quant reference uses in ``quantize``. It is computed
from the floor shift ``q = v >> e`` and the remainder ``r = v - q 2^e in [0, 2^e)``:
``q + 1`` when ``r > 2^(e-1)``, or ``r == 2^(e-1)`` and ``q`` is odd; else ``q``.

Bounds (why int32 accumulators and int64 products suffice). With int8 operands
``x in [-128, 127]``, ``w in [-128, 127]`` and reduction length ``K``::

    |sum_k x_k w_k| <= K * 128 * 128 = K * 2^14        (2^27 at K = 8192)
    |z_x * sum_k w_k| <= 128 * K * 128 = K * 2^14      (zero-point term folded into the bias)
    |acc| <= K * 2^15 + |b|  <  2^31   for K <= 8192 and |b| < 2^31 - 2^28

and the requantization product ``|acc * m| < 2^31 * 2^31 = 2^62`` fits int64.
:func:`check_accumulator` asserts the first bound for a layer at conversion time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

INT32_MAX = 2**31 - 1
MANTISSA_BITS = 31  # |m| < 2^31, so |acc * m| < 2^62 for any int32 acc
MAX_SHIFT = 62


def _ldexp(x: Tensor, e: Tensor) -> Tensor:
    """``x * 2^e`` in float64 (exact: a power-of-two product)."""
    return x.to(torch.float64) * torch.pow(2.0, e.to(torch.float64))


def dyadic(scale: float | Tensor, max_shift: int = MAX_SHIFT) -> tuple[Tensor, Tensor]:
    """Dyadic approximation ``m * 2^-e`` of real multiplier(s) ``scale``.

    Args:
        scale: a float or a tensor of reals (any sign; 0 gives ``m = 0``). Magnitudes
            must be below ``2^30`` (a shift ``e >= 0``).
        max_shift: cap on ``e`` (tiny multipliers then keep fewer mantissa bits); callers
            that add an offset at the ``2^e`` scale lower it to bound the offset.

    Returns:
        ``(m, e)`` int64 tensors of the shape of ``scale`` with ``|m| < 2^31``,
        ``0 <= e <= 62`` and ``|scale - m 2^-e| <= 2^-(e+1)``; for ``|scale| >= 2^-32``
        the relative error is at most ``2^-31``.
    """
    s = torch.as_tensor(scale, dtype=torch.float64).detach().cpu()
    if not torch.isfinite(s).all():
        raise ValueError("dyadic: scale must be finite")
    a = s.abs()
    if (a >= 2.0**30).any():
        raise ValueError(f"dyadic: |scale| must be < 2^30, got {a.max().item():.3g}")
    # exponent of the leading bit; tiny scales saturate at the largest shift
    lead = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    e = torch.clamp((MANTISSA_BITS - 1) - lead, 0, max_shift)
    e = torch.where(a > 0, e, torch.zeros_like(e)).to(torch.int64)
    # s * 2^e is exact in float64 (power-of-two product); round half to even
    m = torch.round(_ldexp(s, e)).to(torch.int64)
    # rounding can carry to 2^31: renormalise by one bit
    over = m.abs() >= 2**MANTISSA_BITS
    if over.any():
        m = torch.where(over, torch.round(_ldexp(s, e - 1)).to(torch.int64), m)
        e = torch.where(over, e - 1, e)
    return m, e


def dyadic_value(m: Tensor, e: Tensor) -> Tensor:
    """The real value ``m * 2^-e`` (float64, exact)."""
    return _ldexp(m.to(torch.float64), -e)


def rshift_round(v: Tensor, e: Tensor | int) -> Tensor:
    """``round(v / 2^e)`` with round half to even, in exact integer arithmetic.

    Uses ``(v + 2^(e-1) - 1 + bit) >> e`` with ``bit = (v >> e) & 1`` (the parity of the
    floor quotient): a remainder above one half carries, exactly one half carries only
    when the floor quotient is odd. For ``e = 0`` the offset is 0.

    Args:
        v: int64 tensor.
        e: non-negative shift(s), broadcastable to ``v``.
    """
    if isinstance(e, int):
        if e == 0:
            return v
        return torch.bitwise_right_shift(v + ((1 << (e - 1)) - 1) + ((v >> e) & 1), e)
    e = e.to(device=v.device, dtype=torch.int64)
    half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(e), e), 1)
    adj = torch.clamp(half - 1 + torch.bitwise_and(torch.bitwise_right_shift(v, e), 1), min=0)
    return torch.bitwise_right_shift(v + adj, e)


@dataclass
class Requant:
    """Integer rescaling ``clamp(rshift_round(acc * m, e) + z, lo, hi)``.

    All fields are int64 tensors broadcastable against the last dimension of the
    accumulator (per-tensor: shape ``()``; per output channel: shape ``(N,)``).

    Attributes:
        m: dyadic mantissas.
        e: dyadic shifts.
        z: output zero points.
        lo, hi: output clamp range.
        out_dtype: dtype of the result (``torch.int8`` between kernels, ``torch.int32``
            for wide intermediates such as the residual stream).
    """

    m: Tensor
    e: Tensor
    z: Tensor
    lo: Tensor
    hi: Tensor
    out_dtype: torch.dtype = torch.int8

    @classmethod
    def from_scale(
        cls,
        scale: float | Tensor,
        zero_point: int | Tensor = 0,
        lo: int | Tensor = -128,
        hi: int | Tensor = 127,
        out_dtype: torch.dtype = torch.int8,
    ) -> Requant:
        """Requantizer for the real multiplier ``scale`` = accumulator scale / output scale."""
        m, e = dyadic(scale)

        def i64(v):
            return torch.as_tensor(v).detach().cpu().round().to(torch.int64)

        return cls(m, e, i64(zero_point), i64(lo), i64(hi), out_dtype)

    @property
    def scale(self) -> Tensor:
        """The realised multiplier ``m 2^-e`` (float64)."""
        return dyadic_value(self.m, self.e)

    def to(self, device: torch.device | str) -> Requant:
        return Requant(
            *(t.to(device) for t in (self.m, self.e, self.z, self.lo, self.hi)), self.out_dtype
        )

    def channels(self, n: int) -> Requant:
        """Every field expanded to ``(n,)`` (what a per-channel kernel epilogue reads)."""
        return Requant(
            *(
                t.expand(n).contiguous() if t.dim() == 0 else t
                for t in (self.m, self.e, self.z, self.lo, self.hi)
            ),
            self.out_dtype,
        )

    def __call__(self, acc: Tensor) -> Tensor:
        """Apply to an integer accumulator (any integer dtype; computed in int64)."""
        dev = acc.device
        m, e, z, lo, hi = (t.to(dev) for t in (self.m, self.e, self.z, self.lo, self.hi))
        v = rshift_round(acc.to(torch.int64) * m, e) + z
        return torch.clamp(v, lo, hi).to(self.out_dtype)

    def state(self) -> dict[str, Tensor]:
        return {"m": self.m, "e": self.e, "z": self.z, "lo": self.lo, "hi": self.hi}


def acc_bound(k: int, a_bits: int = 8, w_bits: int = 8) -> int:
    """Largest ``|sum_k x_k w_k| + |z_x sum_k w_k|`` for signed ``a_bits``/``w_bits`` codes.

    ``x`` and ``z_x`` lie in ``[-2^(a-1), 2^(a-1))`` and ``w`` in ``[-2^(w-1), 2^(w-1))``, so
    each term is at most ``K 2^(a-1) 2^(w-1)``.
    """
    return 2 * k * 2 ** (a_bits - 1) * 2 ** (w_bits - 1)


def check_accumulator(
    k: int, bias: Tensor | None = None, a_bits: int = 8, w_bits: int = 8, where: str = "op"
) -> int:
    """Assert that an int32 accumulator cannot overflow for this layer; returns the bound.

    Raises:
        OverflowError: ``acc_bound(k) + max|bias| > 2^31 - 1``.
    """
    b = int(bias.abs().max().item()) if bias is not None and bias.numel() else 0
    bound = acc_bound(k, a_bits, w_bits) + b
    if bound > INT32_MAX:
        raise OverflowError(
            f"{where}: int32 accumulator may overflow: K={k}, |acc| <= {bound} > 2^31-1"
        )
    return bound


def round_half_even_exact(num: int, den: int) -> int:
    """``round(num / den)`` half to even on Python ints (the oracle for tests)."""
    q, r = divmod(num, den)  # floor division, 0 <= r < den for den > 0
    if 2 * r > den or (2 * r == den and q % 2 == 1):
        q += 1
    return q


def log2_ceil(x: float) -> int:
    """``ceil(log2 x)`` for ``x > 0``."""
    return math.ceil(math.log2(x))
