"""Integer-only softmax: integer exp with range reduction (after I-BERT, Kim et al. 2021,
Alg. 3) and an exact table for ``exp`` on one octave.

For scores ``x = S q`` along the last dimension:

1. **Shift to a working scale.** ``q`` is multiplied (left shift) or divided (rounding
   right shift) by a power of two ``2^t`` so that the working scale
   ``S' = S 2^-t`` lies in ``[ln2 / 2^14, ln2 / 2^13)``.
2. **Subtract the row maximum:** ``q <- q - max_j q_j <= 0`` (``exp`` is shift-invariant).
3. **Range reduction:** with ``q_ln2 = floor(ln2 / S')``, write ``-q = z q_ln2 + r``
   (``0 <= r < q_ln2``), so ``exp(S' q) ~= 2^-z exp(-r S')``; ``z`` is capped at 32 (the value
   is then 0) and ``r`` at ``q_ln2 - 1``.
4. **Table:** ``q_exp = T[r] >> z`` with ``T[r] = round(2^30 exp(-r S'))`` (``q_ln2 < 2^14``
   entries, built at construction). I-BERT's second-order polynomial here had a relative error
   up to ~2e-3 -- half an 8-bit probability step -- and was the largest integer-vs-float
   difference of the attention; the table's is ``2^-30`` plus the ``z`` shift's floor.
5. **Normalise:** ``out = floor(q_exp 2^k / sum_j q_exp_j)``, output scale ``2^-k``.

Error: the working-scale rounding (``S' / 2`` in ``x``, relative ``<= 4.3e-5`` in ``exp``) and
the floors (``2^-k``), so ``max |softmax_int - softmax| <~ 1e-4`` for ``k = 16`` (measured in
the tests). Monotone: ``T`` is decreasing, and across a segment boundary
``T[q_ln2 - 1] > 2^29 = T[0] / 2`` (as ``(q_ln2 - 1) S' < ln2``), so ``q_exp`` is non-decreasing
in ``q`` and ``x_i <= x_j`` implies ``out_i <= out_j`` within a row.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer.dyadic import Requant, rshift_round

Tensor = torch.Tensor

TABLE_BITS = 30
LN2 = math.log(2.0)
WORK_BITS = 13  # q_ln2 in [2^13, 2^14)
MAX_Z = 32


def softmax_shift(scale: float) -> int:
    """``t`` with ``scale 2^-t in [ln2 / 2^14, ln2 / 2^13)`` (positive: left shift input)."""
    return math.floor(math.log2(scale * 2**WORK_BITS / LN2)) + 1


def exp_table(scale: float) -> tuple[int, Tensor]:
    """``(q_ln2, T)`` at working scale ``scale``: ``T[r] = round(2^30 exp(-r scale))``."""
    q_ln2 = math.floor(LN2 / scale)
    r = torch.arange(q_ln2, dtype=torch.float64)
    return q_ln2, torch.round(torch.exp(-r * scale) * 2.0**TABLE_BITS).to(torch.int64)


def t_exp(q: Tensor, q_ln2: int, table: Tensor) -> Tensor:
    """Integer ``exp`` of non-positive ``q`` (int64) at the working scale (steps 3-4)."""
    z = torch.clamp(torch.div(-q, q_ln2, rounding_mode="floor"), max=MAX_Z)
    r = torch.clamp(-q - z * q_ln2, max=q_ln2 - 1)  # [0, q_ln2); the cap keeps z=32 harmless
    return torch.bitwise_right_shift(table.to(q.device)[r], z)


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
            raise HawqError(
                f"IntSoftmax: scale {scale:.3g} is too large: |q| <= {in_max} "
                f"shifted left by {self.shift} overflows int64"
            )
        if self.shift < -62:
            raise HawqError(
                f"IntSoftmax: scale {scale:.3g} is too small (a right shift by {-self.shift} > 62)"
            )
        q_ln2, table = exp_table(self.scale * 2.0**-self.shift)
        self.register_buffer("q_ln2", torch.tensor(q_ln2, dtype=torch.int64))  # for export
        self.register_buffer("exp_table", table)
        self.q_ln2_int = q_ln2  # host int: no device sync or graph break per call
        self.out_scale = 2.0**-out_bits

    def forward(self, q: Tensor, rq: Requant | None = None) -> Tensor:
        """Softmax codes at ``2^-k`` (int64), or ``rq`` of them (a per-tensor requantizer)."""
        from hawq.integer import ops

        if ops.resolve(q) == "cpu" and (rq is None or rq.out_dtype == torch.int8):
            from hawq.integer import cpu

            return cpu.softmax(q, self.shift, self.q_ln2_int, self.exp_table, self.out_bits, rq)
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
        e = t_exp(q, self.q_ln2_int, self.exp_table)
        total = e.sum(dim=-1, keepdim=True)  # >= T[0] = 2^30: the row maximum contributes
        return torch.div(torch.bitwise_left_shift(e, self.out_bits), total, rounding_mode="floor")

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, shift={self.shift}, out_bits={self.out_bits}"
