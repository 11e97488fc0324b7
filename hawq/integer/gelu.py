"""Integer-only GELU (I-BERT, Kim et al. 2021, Alg. 2).

``GELU(x) = x/2 (1 + erf(x / sqrt 2))`` with erf replaced by the second-order fit

    L(u) = sign(u) * (1 - a (min(|u|, b) - b)^2),   a = 0.2888, b = 1.769

(``L(0+) = 1 - a b^2 = 0.096``: the fit minimises the GELU error, not the erf error).
For an input ``x = S q`` (integer ``q``, real scale ``S`` fixed at conversion), with
``S_e = S / sqrt 2`` and the integer constants

    q_b = floor(b / S_e),    q_1 = floor(1 / (a S_e^2))

the integer pipeline is

    q_L   = sign(q) * (q_1 - (min(|q|, q_b) - q_b)^2)      erf(x/sqrt 2) ~= a S_e^2 q_L
    q_out = rshift_round(q * (q_L + q_1), t)                GELU(x) ~= S_out q_out
    S_out = S * a S_e^2 / 2 * 2^t

where the rounding shift ``t`` brings the largest output below ``2^31`` (an int32 that a
dyadic requantizer can take: ``|q| <= in_max`` and ``0 <= q_L + q_1 <= 2 q_1``).

Every runtime operation is an int64 add, multiply, compare or sign; the only reals are
``S`` and ``S_out``, used when building the constants. Error: the fit's own error
(``max |GELU_int - GELU| ~ 0.02`` near ``|x| ~ 1.3-2.5``, see the tests for the measured
bound) plus the flooring of ``q_b, q_1`` (relative ``~S``). For ``x >= 0`` the result is
non-decreasing in ``q`` (``q_L + q_1 >= 0`` and non-decreasing), like GELU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer.dyadic import rshift_round

Tensor = torch.Tensor

A = 0.2888
B = 1.769
INT64_SAFE = 2**62


def gelu_constants(scale: float) -> tuple[int, int, float]:
    """``(q_b, q_1, S_out)`` for input scale ``scale``."""
    s_e = scale / math.sqrt(2.0)
    q_b = math.floor(B / s_e)
    q_1 = math.floor(1.0 / (A * s_e * s_e))
    return q_b, q_1, scale * A * s_e * s_e / 2.0


def i_gelu(q: Tensor, q_b: int, q_1: int, t: int = 0) -> Tensor:
    """The integer pipeline of the module docstring (int64 in, int64 out)."""
    q = q.to(torch.int64)
    q_abs = torch.clamp(q.abs(), max=q_b)
    q_l = torch.sign(q) * (q_1 - (q_abs - q_b) ** 2)
    out = q * (q_l + q_1)
    return rshift_round(out, t) if t else out


class IntGELU(nn.Module):
    """GELU on integers at a fixed input scale.

    Args:
        scale: input scale ``S``.
        in_max: largest ``|q|`` the input can hold (checked against int64 overflow:
            ``in_max * 2 q_1 < 2^62``).

    Attributes:
        out_scale: ``S_out`` of the module docstring.
    """

    def __init__(self, scale: float, in_max: int) -> None:
        super().__init__()
        if not (math.isfinite(float(scale)) and scale > 0):
            raise HawqError(f"IntGELU: input scale must be finite and > 0, got {scale!r}")
        q_b, q_1, out_scale = gelu_constants(float(scale))
        if q_b < 2 or q_1 < 2:  # the knee b of the fit below two codes: no resolution left
            raise HawqError(
                f"IntGELU: scale {scale:.3g} is too coarse for the polynomial "
                f"(q_b={q_b}, q_1={q_1}); use a finer GELU grid"
            )
        if in_max * 2 * q_1 >= INT64_SAFE:
            raise HawqError(f"IntGELU: scale {scale:.3g} with |q| <= {in_max} overflows int64")
        self.t = max(0, (in_max * 2 * q_1).bit_length() - 31)
        self.register_buffer("q_b", torch.tensor(q_b, dtype=torch.int64))  # for export
        self.register_buffer("q_1", torch.tensor(q_1, dtype=torch.int64))
        self.consts = (q_b, q_1)  # host ints: no device sync or graph break per call
        self.scale, self.out_scale, self.in_max = float(scale), out_scale * 2.0**self.t, in_max

    def forward(self, q: Tensor) -> Tensor:
        return i_gelu(q, *self.consts, self.t)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, out_scale={self.out_scale:.4g}, t={self.t}"


MAX_TABLE = 2**20  # entries


def gelu_table(
    scale: float, lo: int, hi: int, out_scale: float, out_zero: int, out_lo: int, out_hi: int
) -> Tensor:
    """The exact integer GELU: ``table[q - lo] = clamp(round(GELU(S q) / s_out) + z, lo', hi')``
    for every input code ``q in [lo, hi]``, GELU in float64 (``x/2 (1 + erf(x / sqrt 2))``),
    round half to even. At run time GELU and the requantization onto the next grid are one
    integer lookup (the table is the op's semantics); its only error is the output
    rounding, ``s_out / 2``, against ~0.02 absolute for the polynomial of :class:`IntGELU`.

    Raises:
        HawqError: non-finite or non-positive scales, or more than :data:`MAX_TABLE` codes.
    """
    gelu = lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # noqa: E731
    return pointwise_table(gelu, scale, lo, hi, out_scale, out_zero, out_lo, out_hi, "GELU")


def pointwise_table(
    fn,
    scale: float,
    lo: int,
    hi: int,
    out_scale: float,
    out_zero: int,
    out_lo: int,
    out_hi: int,
    what: str = "pointwise",
) -> Tensor:
    """``table[q - lo] = clamp(round(fn(S q) / s_out) + z, lo', hi')`` for every input code
    ``q in [lo, hi]``, ``fn`` evaluated in float64 (any elementwise function: GELU, tanh,
    sigmoid, SiLU), round half to even: the function and the requantization onto the next
    grid as one exact integer lookup.

    Raises:
        HawqError: non-finite or non-positive scales, or more than :data:`MAX_TABLE` codes.
    """
    for name, v in (("input", scale), ("output", out_scale)):
        if not (math.isfinite(float(v)) and v > 0):
            raise HawqError(f"{what} table: {name} scale must be finite and > 0, got {v!r}")
    if not 0 < hi - lo + 1 <= MAX_TABLE:
        raise HawqError(f"{what} table: {hi - lo + 1} input codes (at most {MAX_TABLE})")
    x = torch.arange(lo, hi + 1, dtype=torch.float64) * float(scale)
    y = fn(x).to(torch.float64)
    q = torch.clamp(torch.round(y / float(out_scale)) + out_zero, out_lo, out_hi)
    dtype = torch.int8 if -128 <= out_lo and out_hi <= 127 else torch.int32
    return q.to(dtype)
