"""FP8 execution of FP8 plans: float8 codes and ``torch._scaled_mm`` in place of fake quant.

An op whose weight and activation quantizers both use an FP8 format computes, in the
fake-quant model, ``linear(s_x Q(x / s_x), s_w Q(W / s_w), b)`` with ``Q`` the minifloat
rounding of :func:`~hawq.quant.formats.round_minifloat`. Here ``Q(x / s)`` is a float8 code,
``to_fp8(x, s)`` (torch's cast rounds half to even and, after the clamp, saturates like
``Q``: the same values bit for bit), and the product runs on codes through
:func:`hawq.integer.ops.fp8_linear`::

    y = (x8 @ w8^T) * (s_x s_w) + b        x8 (..., K), w8 (N, K) float8, s_w 0-d or (N,)

which is the fake-quant output up to the rounding of its fp32 matmul (the ``reference``
backend sums the products in float64, ``_scaled_mm`` in fp32).

* :class:`Fp8Linear` -- a ``QuantLinear`` with fp8 weight and activation quantizers.
* :class:`Fp8Conv2d` -- a ``QuantConv2d`` (groups 1, BN folded, eval form) by im2col
  (``F.unfold``) and the same GEMM; its zero padding is exact (0 is a code).
* :func:`convert_fp8` -- a copy of a fake-quant model with those ops swapped. Matmuls
  (attention's ``q k^T`` and ``attn v``: activation x activation), grouped convs and
  int-format ops stay fake-quant; the copy lists both sets (``fp8_ops``,
  ``fake_quant_ops``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.quant.api import _set_module, quant_ops
from hawq.quant.formats import MINIFLOATS, fp8_scale
from hawq.quant.modules import QuantConv2d, QuantLinear
from hawq.quant.quantizer import Quantizer

Tensor = torch.Tensor
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def to_fp8(x: Tensor, scale: Tensor | float, fmt: str = "fp8_e4m3") -> Tensor:
    """Float8 codes of ``x``: ``clamp(x / s, -v_max, v_max)`` cast to ``fmt`` (RNE, saturating).

    ``to_fp8(x, s).float() * s`` is the fake quantizer's ``s * Q(x / s)``.
    """
    v_max = MINIFLOATS[fmt][2]
    return torch.clamp(x / scale, -v_max, v_max).to(FP8_DTYPES[fmt])


def quantize_act(x: Tensor, fmt: str, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x8, s)`` with ``x ~ x8 s``: ``s`` the calibrated scale, or when None the dynamic
    quantizer's per-call ``amax(|x|) / v_max``."""
    s = fp8_scale(x, fmt) if scale is None else scale
    return to_fp8(x, s, fmt), s


def is_fp8(q: Quantizer | None) -> bool:
    return q is not None and q.fmt in FP8_DTYPES


def fp8_convertible(op: nn.Module) -> bool:
    """A quantized Linear, or a groups-1 Conv2d with numeric padding, whose weight and
    activation are both fp8."""
    if isinstance(op, QuantConv2d):
        ok_conv = op.groups == 1 and not isinstance(op.padding, str)
        return ok_conv and is_fp8(op.w_quant) and is_fp8(op.a_quant)
    return isinstance(op, QuantLinear) and is_fp8(op.w_quant) and is_fp8(op.a_quant)


def has_fp8_ops(qmodel: nn.Module) -> bool:
    """True when :func:`convert_fp8` would replace at least one op of ``qmodel``."""
    return any(fp8_convertible(op) for op in quant_ops(qmodel).values())


class _Fp8Op(nn.Module):
    """Float8 weight codes ``w8`` (N, K), their scale ``s_w`` (0-d or (N,)), the fp32 bias, and
    the input's format and scale (the calibrated ``s_x``, or ``amax(|x|) / v_max`` per call
    when the activation quantizer is dynamic)."""

    def __init__(self, name: str, op: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        wq, aq = op.w_quant, op.a_quant
        if not aq.dynamic and not bool(aq.ready):
            raise HawqError(f"op {name}: activation quantizer is not calibrated")
        w_hat = op.quantized_weight().detach()  # s_w Q(W_f / s_w), BN folded
        s_w = _weight_scale(op, wq)  # keep-dim, broadcasts against w_hat
        n = w_hat.shape[0]
        self.register_buffer("weight", to_fp8(w_hat, s_w, wq.fmt).reshape(n, -1))  # (N, K)
        self.register_buffer("w_scale", s_w.reshape(-1) if s_w.numel() > 1 else s_w.reshape(()))
        b = op.folded()[1] if isinstance(op, QuantConv2d) else op.bias
        self.register_buffer("bias", None if b is None else b.detach().float().clone())
        self.w_fmt, self.a_fmt, self.dynamic = wq.fmt, aq.fmt, aq.dynamic
        self.register_buffer("a_scale", aq.scale.detach().float().reshape(()).clone())

    def extra_repr(self) -> str:
        return (
            f"weight={tuple(self.weight.shape)} {self.w_fmt}, a_format={self.a_fmt}, "
            f"dynamic={self.dynamic}, per_channel={self.w_scale.dim() > 0}"
        )

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_act(x, self.a_fmt, None if self.dynamic else self.a_scale)

    def gemm(self, x8: Tensor, s_x: Tensor) -> Tensor:
        return ops.fp8_linear(x8, self.weight, s_x, self.w_scale, self.bias)


def _weight_scale(op: QuantLinear | QuantConv2d, wq: Quantizer) -> Tensor:
    """The weight quantizer's scale (from the weight itself when it is dynamic, QAT ``ste``)."""
    if not wq.dynamic:
        return wq.scale.detach().float()
    gran = "per_tensor" if wq.granularity == "per_group" else wq.granularity
    return (
        fp8_scale(
            op.folded()[0] if isinstance(op, QuantConv2d) else op.weight, wq.fmt, gran, wq.axis
        )
        .detach()
        .float()
    )


class Fp8Linear(_Fp8Op):
    """``fp8_linear(to_fp8(x, s_x), w8, s_x, s_w, b)``: x (..., K) -> (..., N) fp32."""

    def forward(self, x: Tensor) -> Tensor:
        return self.gemm(*self.quantize_input(x))


class Fp8Conv2d(_Fp8Op):
    """Conv2d (groups 1) as ``fp8_linear`` on im2col columns: x (B, C, H, W) -> (B, N, Ho, Wo)."""

    def __init__(self, name: str, op: QuantConv2d) -> None:
        super().__init__(name, op)
        self.geometry = {
            k: getattr(op, k) for k in ("kernel_size", "dilation", "padding", "stride")
        }

    def forward(self, x: Tensor) -> Tensor:
        x8, s = self.quantize_input(x)
        bsz, _, h, w = x.shape
        cols = F.unfold(x8.float(), **self.geometry)  # (B, C*kh*kw, L): codes, exact in fp32
        y = self.gemm(cols.transpose(1, 2).to(x8.dtype), s)  # (B, L, N)
        (kh, kw), (dh, dw) = self.geometry["kernel_size"], self.geometry["dilation"]
        (ph, pw), (sh, sw) = self.geometry["padding"], self.geometry["stride"]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return y.transpose(1, 2).reshape(bsz, -1, ho, wo)


@torch.no_grad()
def convert_fp8(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` (eval mode, same device) whose fp8 Linear/Conv2d ops run on codes.

    Returns:
        The copy, with ``fp8_ops`` (the replaced op names) and ``fake_quant_ops`` (quantized
        ops left as fake quant) attributes.
    """
    model = copy.deepcopy(qmodel).eval()
    fp8, rest = [], []
    for name, op in quant_ops(model).items():
        if not fp8_convertible(op):
            rest.append(name)
            continue
        cls = Fp8Conv2d if isinstance(op, QuantConv2d) else Fp8Linear
        _set_module(model, name, cls(name, op))
        fp8.append(name)
    if not fp8:
        raise HawqError(
            "no op has fp8 weight and activation formats; the fp8 path needs a plan "
            "with w_format and a_format fp8_e4m3 or fp8_e5m2"
        )
    model.fp8_ops, model.fake_quant_ops = fp8, rest
    return model
