"""Integer-only softmax: integer exp with range reduction (I-BERT, Kim et al. 2021, Alg. 3).

For scores ``x = S q`` along the last dimension:

1. **Shift to a working scale.** ``q`` is multiplied (left shift) or divided (rounding
   right shift) by a power of two ``2^t`` so that the working scale
   ``S' = S 2^-t`` lies in ``[ln2 / 2^14, ln2 / 2^13)``: enough resolution for the
   polynomial, and every product below stays far from int64 overflow.
2. **Subtract the row maximum:** ``q <- q - max_j q_j <= 0`` (``exp`` is shift-invariant).
3. **Range reduction:** with ``q_ln2 = floor(ln2 / S')``, write ``-q = z q_ln2 + r``
   (``0 <= r < q_ln2``), so ``x = -z ln2 + p`` with ``p = -r S' in (-ln2, 0]`` and
   ``exp(x) = 2^-z exp(p)``.
4. **Polynomial:** ``exp(p) ~= a (p + b)^2 + c`` on ``(-ln2, 0]`` with I-BERT's
   ``a = 0.3585, b = 1.353``; in integers ``q_exp = ((q_p + q_b)^2 + q_c) >> z`` with
   ``q_b = floor(b / S')`` and scale ``a S'^2``. I-BERT's ``c = 0.344`` leaves the
   piecewise function slightly *decreasing* across a segment boundary
   (``2 exp~(-ln2) = 1.000186 < exp~(0) = 1.000273``); we take instead the integer
   ``q_c = q_b^2 - 2 (q_b - q_ln2 + 1)^2`` (``c ~= a b^2 - 2 a (b - ln2)^2 = 0.34409``),
   which makes ``2 poly(-(q_ln2 - 1)) = poly(0)`` exactly, so ``q_exp`` is monotone.
   ``z`` is capped at 32 (the value is then 0: ``q_exp < 2^32``).
5. **Normalise:** ``out = floor(q_exp 2^k / sum_j q_exp_j)``, output scale ``2^-k``.

Error: the polynomial's relative error is below ``~2e-3`` on ``(-ln2, 0]`` and the
normalisation floors at ``2^-k``, so ``max |softmax_int - softmax| <~ 2e-3`` (measured in
the tests). Monotone: within a row, ``x_i <= x_j`` implies ``out_i <= out_j`` (``q_exp`` is
non-decreasing in ``q``: within a segment the parabola is increasing on ``p > -b`` and at
a segment boundary ``floor(A / 2^(z-1)) = floor(2A / 2^z) >= floor(B / 2^z)`` because
``2A = B`` by the choice of ``q_c``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer.dyadic import Requant, rshift_round

Tensor = torch.Tensor

A = 0.3585
B = 1.353
LN2 = math.log(2.0)
WORK_BITS = 13  # q_ln2 in [2^13, 2^14)
MAX_Z = 32


def softmax_shift(scale: float) -> int:
    """``t`` with ``scale 2^-t in [ln2 / 2^14, ln2 / 2^13)`` (positive: left shift input)."""
    return math.floor(math.log2(scale * 2**WORK_BITS / LN2)) + 1


def exp_constants(scale: float) -> tuple[int, int, int, float]:
    """``(q_ln2, q_b, q_c, S_exp)`` at working scale ``scale`` (``q_c`` from continuity)."""
    q_ln2, q_b = math.floor(LN2 / scale), math.floor(B / scale)
    q_c = q_b * q_b - 2 * (q_b - q_ln2 + 1) ** 2
    return q_ln2, q_b, q_c, A * scale * scale


def i_exp(q: Tensor, q_ln2: int, q_b: int, q_c: int) -> Tensor:
    """Integer ``exp`` of non-positive ``q`` (int64) at the working scale (steps 3-4)."""
    z = torch.clamp(torch.div(-q, q_ln2, rounding_mode="floor"), max=MAX_Z)
    q_p = torch.clamp(q + z * q_ln2, min=-q_ln2)  # (-q_ln2, 0]; the cap keeps z=32 harmless
    return torch.bitwise_right_shift((q_p + q_b) ** 2 + q_c, z)


class IntSoftmax(nn.Module):
    """Softmax over the last dimension of integer scores at a fixed input scale.

    Args:
        scale: input scale ``S``.
        out_bits: ``k``: the output is ``softmax * 2^k`` (scale ``2^-k``), in ``[0, 2^k]``.
        in_max: largest ``|q|`` of the input (int32 scores by default).

    Attributes:
        out_scale: ``2^-k``.

    Raises:
        HawqError: a scale that is not finite and positive, or so extreme that the shift to
            the working scale would overflow int64 (``in_max 2^t >= 2^62``) or exceed a
            62-bit right shift; ``out_bits`` outside ``[1, 30]``.
    """

    def __init__(self, scale: float, out_bits: int = 16, in_max: int = 2**31 - 1) -> None:
        super().__init__()
        self.scale, self.out_bits = float(scale), out_bits
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise HawqError(f"IntSoftmax: input scale must be finite and > 0, got {scale!r}")
        if not 1 <= out_bits <= 30:
            raise HawqError(f"IntSoftmax: out_bits must lie in [1, 30], got {out_bits}")
        self.shift = softmax_shift(self.scale)
        if self.shift > 0 and int(in_max) << self.shift >= 2**62:
            raise HawqError(f"IntSoftmax: scale {scale:.3g} is too large: |q| <= {in_max} "
                            f"shifted left by {self.shift} overflows int64")  # fmt: skip
        if self.shift < -62:
            raise HawqError(f"IntSoftmax: scale {scale:.3g} is too small (a right shift by "
                            f"{-self.shift} > 62)")  # fmt: skip
        q_ln2, q_b, q_c, _ = exp_constants(self.scale * 2.0**-self.shift)
        for name, v in (("q_ln2", q_ln2), ("q_b", q_b), ("q_c", q_c)):  # for export
            self.register_buffer(name, torch.tensor(v, dtype=torch.int64))
        self.consts = (q_ln2, q_b, q_c)  # host ints: no device sync or graph break per call
        self.out_scale = 2.0**-out_bits

    def forward(self, q: Tensor, rq: Requant | None = None) -> Tensor:
        """Softmax codes at ``2^-k`` (int64), or ``rq`` of them (a per-tensor requantizer)."""
        from hawq.integer import ops

        if ops.resolve(q) == "cpu" and (rq is None or rq.out_dtype == torch.int8):
            from hawq.integer import cpu

            return cpu.softmax(q, self.shift, self.consts, self.out_bits, rq)
        out = self.reference(q)
        return out if rq is None else rq(out)

    def reference(self, q: Tensor) -> Tensor:
        """The defining int64 torch computation (steps 1-5)."""
        q = q.to(torch.int64)
        if self.shift > 0:
            q = torch.bitwise_left_shift(q, self.shift)
        elif self.shift < 0:
            q = rshift_round(q, -self.shift)
        q = q - q.amax(dim=-1, keepdim=True)
        e = i_exp(q, *self.consts)
        total = e.sum(dim=-1, keepdim=True)  # >= q_exp(0) > 0: the row maximum contributes
        return torch.div(torch.bitwise_left_shift(e, self.out_bits), total, rounding_mode="floor")

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, shift={self.shift}, out_bits={self.out_bits}"
