"""Integer layers: integer tensors in, integer tensors out, constants held as buffers.

Every layer is built at conversion time from real scales and stores only integers
(weights, int32 biases, dyadic mantissas/shifts, zero points, clamp bounds); its
forward pass goes through :mod:`hawq.integer.ops` or integer torch ops only.

Zero points are folded into the bias: for an input grid with stored zero point ``z_x``
and symmetric weights, ``sum_k (x_k - z_x) w_nk = sum_k x_k w_nk - z_x sum_k w_nk``, so
the kernel sees ``bias_n = round(b_n / (s_x s_w,n)) - z_x sum_k w_nk`` (int32 at scale
``s_x s_w,n``).
"""

from __future__ import annotations

import torch
from torch import nn

from hawq.integer import ops
from hawq.integer.adapter import Grid, MatMulSpec, WeightSpec
from hawq.integer.dyadic import Requant, check_accumulator

Tensor = torch.Tensor

#: clamp of wide (int32) intermediates such as the residual stream before an add
WIDE = 2**30


class IntRequant(nn.Module):
    """:class:`~hawq.integer.dyadic.Requant` as a module (buffers ``m, e, z, lo, hi``).

    Args:
        scale: real multiplier(s) ``s_in / s_out`` (scalar or per channel of the last dim).
        zero, lo, hi: output zero point(s) and clamp range.
        out_dtype: int8 between kernels, int32 for wide intermediates.
    """

    def __init__(
        self,
        scale: float | Tensor,
        zero: int | Tensor = 0,
        lo: int | Tensor = -128,
        hi: int | Tensor = 127,
        out_dtype: torch.dtype = torch.int8,
    ) -> None:
        super().__init__()
        rq = Requant.from_scale(scale, zero, lo, hi, out_dtype)
        for key, t in rq.state().items():
            self.register_buffer(key, t)
        self.out_dtype = out_dtype

    @property
    def requant(self) -> Requant:
        return Requant(self.m, self.e, self.z, self.lo, self.hi, self.out_dtype)

    def forward(self, acc: Tensor) -> Tensor:
        return ops.requant(acc, self.requant)

    @classmethod
    def to_grid(cls, scale: float | Tensor, grid: Grid, relu: bool = False) -> IntRequant:
        """Requantize a value at real scale ``scale`` onto ``grid`` (optionally ReLU'd)."""
        lo = max(grid.lo, grid.zero) if relu else grid.lo
        return cls(torch.as_tensor(scale, dtype=torch.float64) / grid.scale, grid.zero, lo, grid.hi)


def _acc_scale(spec: WeightSpec) -> Tensor:
    return spec.act.scale * spec.scale  # (N,) float64


def _int_bias(spec: WeightSpec) -> Tensor:
    """``round(b / (s_x s_w)) - z_x sum_k w`` as int32 (checked against overflow)."""
    n = spec.codes.shape[0]
    colsum = spec.codes.reshape(n, -1).to(torch.int64).sum(1)
    b = torch.zeros(n, dtype=torch.int64)
    if spec.bias is not None:
        b = torch.round(spec.bias / _acc_scale(spec)).to(torch.int64)
    k = spec.codes[0].numel()
    check_accumulator(k, b, spec.act.bits, max(spec.bits, 2), where=spec.name)
    return (b - spec.act.zero * colsum).to(torch.int32)


class IntLinear(nn.Module):
    """``requant(x @ W^T + b)``: int8 in, int8 (or int32) out.

    Args:
        spec: the op's weights, scales and input grid.
        out: the output requantizer, built by the caller from ``acc_scale``; None returns
            the int32 accumulator.
        pack_int4: store <= 4-bit weights packed two per byte.
    """

    def __init__(self, spec: WeightSpec, out: IntRequant | None, pack_int4: bool = True) -> None:
        super().__init__()
        w = spec.codes.reshape(spec.codes.shape[0], -1)
        self.k = w.shape[1]
        self.w_bits = spec.bits
        self.register_buffer("weight", ops.pack_int4(w) if pack_int4 and spec.bits <= 4 else w)
        self.register_buffer("bias", _int_bias(spec))
        self.register_buffer("acc_scale", _acc_scale(spec))  # for export / inspection only
        self.rq = out

    def forward(
        self, x: Tensor, residual: Tensor | None = None, limit: int = 0, lut: Tensor | None = None
    ) -> Tensor:
        """``requant(x W^T + b)``, then ``lut`` and a residual add clamped to ``+-limit``."""
        return ops.int_linear(
            x,
            self.weight,
            self.bias,
            self.rq.requant if self.rq else None,
            k=self.k,
            lut=lut,
            residual=residual,
            limit=limit,
        )


class IntConv2d(IntLinear):
    """``requant(conv2d(pad(x, z_x), W) + b)``; NCHW, channels requantized on dim 1."""

    def __init__(self, spec: WeightSpec, out: IntRequant | None, pack_int4: bool = True) -> None:
        super().__init__(spec, out, pack_int4)
        self.shape = tuple(spec.codes.shape)
        self.stride, self.padding, self.pad_value = spec.stride, spec.padding, spec.act.zero

    def weight4(self) -> Tensor:
        """The int8 (N, C, kh, kw) weight, unpacked once per weight tensor (kernels that
        prepack weights cache them by tensor identity)."""
        if getattr(self, "_w4_of", None) is not self.weight:
            self._w4 = ops.weight_int8(self.weight, self.k).reshape(self.shape)
            self._w4_of = self.weight
        return self._w4

    def forward(
        self, x: Tensor, residual: Tensor | None = None, limit: int = 0, relu: bool = False
    ) -> Tensor:
        """``requant(conv(x) + b)``, then optionally ``clamp(. + residual)`` (see
        :func:`~hawq.integer.ops.int_conv2d`)."""
        w = self.weight4()
        return ops.int_conv2d(
            x,
            w,
            self.bias,
            self.rq.requant if self.rq else None,
            self.stride,
            self.padding,
            self.pad_value,
            residual,
            limit,
            relu,
        )


class IntMatMul(nn.Module):
    """``requant((a - z_a) @ (b - z_b))`` at accumulator scale ``s_a s_b``."""

    def __init__(self, spec: MatMulSpec, out: IntRequant | None) -> None:
        super().__init__()
        self.za, self.zb = spec.a.zero, spec.b.zero
        self.acc_scale = spec.a.scale * spec.b.scale
        self.rq = out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return ops.int_matmul(a, b, self.za, self.zb, self.rq.requant if self.rq else None)


# ---------------------------------------------------------------- whole-model pieces

LOGIT_BITS = 16  # int32 logits clamped to a 16-bit grid covering the calibrated range


def residual_format(absmax: float, bits: int) -> tuple[int, float]:
    """``(limit, s_r)``: the residual stream's code bound ``2^(bits-1) - 1`` and the scale at
    which ``limit`` codes cover ``absmax``."""
    limit = 2 ** (bits - 1) - 1
    return limit, max(absmax, 1e-6) / limit


class IntegerModel(nn.Module):
    """An integer-only classifier: ``quantize_input`` (float -> int8 codes), ``forward_int``
    (codes -> int32 logits at ``logit_scale``), and :meth:`forward` chaining them."""

    logit_scale: float

    def quantize_input(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_int(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Float images -> float logits (quantize, integer graph, dequantize)."""
        return self.forward_int(self.quantize_input(images)).to(torch.float32) * self.logit_scale
