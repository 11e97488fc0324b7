"""Read a fake-quant model from :mod:`hawq.quant` into plain integer specifications.

This is the only module that knows the internals of ``hawq.quant`` (its
:class:`~hawq.quant.Quantizer` and quantized op wrappers); everything downstream works
on :class:`Grid`, :class:`WeightSpec` and :class:`MatMulSpec`.

**Activation grids.** A fake quantizer maps ``x`` to codes
``q = clamp(round(x / s + z), q_min, q_max)`` and back to ``(q - z) s``. The integer graph
stores codes as int8 two's complement, shifted by ``shift = -2^(b-1) - q_min`` (0 for a
signed grid, ``-2^(b-1)`` for an unsigned one), so a ``b``-bit grid occupies
``[-2^(b-1), 2^(b-1) - 1]`` and the stored zero point is ``z + shift``. PACT grids have
``s = alpha / n`` and ``z = 0``; an LSQ+ offset ``beta`` becomes the zero point
``-beta / s``, rounded to an integer (the only approximation made here).

**Weights.** Codes are recovered from the quantizer's own output:
``w_q = round(Q(W) / s)`` per output channel (``Q(W)`` with BN folded for a conv whose
wrapper folds it). Weights must be symmetric (zero point 0); the 1-bit sign grid
``{-s/2, s/2}`` becomes codes ``+-1`` at scale ``s/2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hawq.errors import HawqError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Grid:
    """An activation operand's integer grid in the int8 storage domain.

    Attributes:
        scale: real step ``s``.
        zero: stored zero point (the int8 code of real 0).
        lo, hi: stored code range.
        bits: grid bits.
        shift: stored code = fake-quant code + ``shift``.
    """

    scale: float
    zero: int
    lo: int
    hi: int
    bits: int
    shift: int = 0

    def quantize(self, x: Tensor) -> Tensor:
        """Float -> int8 codes exactly as the fake quantizer rounds (float32 arithmetic)."""
        s = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        z = float(self.zero - self.shift)
        q = torch.clamp(torch.round(x.float() / s + z), self.lo - self.shift, self.hi - self.shift)
        return (q + self.shift).to(torch.int8)

    def dequantize(self, q: Tensor) -> Tensor:
        return (q.to(torch.float32) - self.zero) * self.scale

    def as_dict(self) -> dict:
        return {
            "scale": self.scale,
            "zero": self.zero,
            "lo": self.lo,
            "hi": self.hi,
            "bits": self.bits,
            "shift": self.shift,
        }


@dataclass
class WeightSpec:
    """A Linear or Conv2d op: integer weights, per-channel scales, float bias, input grid."""

    name: str
    kind: str  # "linear" | "conv2d"
    codes: Tensor  # int8 (N, K) or (N, C, kh, kw)
    scale: Tensor  # float64 (N,), may be negative after folding a BN with gamma < 0
    bits: int
    bias: Tensor | None  # float64 (N,)
    act: Grid
    stride: int = 1
    padding: int = 0


@dataclass
class MatMulSpec:
    """An activation x activation product: the grids of both operands."""

    name: str
    a: Grid
    b: Grid


def _unsupported(name: str, what: str) -> HawqError:
    return HawqError(
        f"op {name}: {what} has no integer-only form; the integer stage needs "
        "static int activations (2-8 bits) and symmetric int weights "
        "(per tensor or per channel)"
    )


def act_grid(q: nn.Module | None, name: str) -> Grid:
    """The :class:`Grid` of an activation :class:`~hawq.quant.Quantizer`."""
    if q is None:
        raise _unsupported(name, "a floating-point activation")
    if q.fmt != "int":
        raise _unsupported(name, f"activation format {q.fmt}")
    if q.dynamic:
        raise _unsupported(name, "a dynamic activation range")
    if q.bits < 2:
        raise _unsupported(name, "a 1-bit activation")
    if not bool(q.ready):
        raise HawqError(f"op {name}: activation quantizer is not calibrated")
    bits, q_min, q_max = int(q.bits), int(q.q_min), int(q.q_max)
    if q.learn == "pact":
        n = (2 ** (bits - 1) - 1) if q.signed else (2**bits - 1)
        scale = float(q.alpha.detach().abs().clamp(min=1e-8)) / n
        q_min, q_max, zero = (-n if q.signed else 0), n, 0
    elif q.learn == "lsqplus":
        scale = float(q.scale.detach().abs().clamp(min=1e-8))
        zero = round(-float(q.offset.detach()) / scale)
    else:
        scale = float(q.scale.detach().abs().clamp(min=1e-8))
        zero = round(float(q.zero_point.detach()))
    shift = -(2 ** (bits - 1)) - q_min if q_min >= 0 else 0
    return Grid(scale, zero + shift, q_min + shift, q_max + shift, bits, shift)


def weight_codes(wq: nn.Module, w_hat: Tensor, name: str) -> tuple[Tensor, Tensor, int]:
    """``(codes int8, per-channel scale float64 (N,), bits)`` of a fake-quantized weight."""
    if wq is None:
        raise _unsupported(name, "a floating-point weight")
    if wq.fmt != "int":
        raise _unsupported(name, f"weight format {wq.fmt}")
    if wq.dynamic:
        raise _unsupported(name, "a dynamic weight range")
    if wq.granularity == "per_group":
        raise _unsupported(name, "a per-group weight scale")
    if not wq.symmetric or (getattr(wq, "offset", None) is not None and wq.offset.abs().max() > 0):
        raise _unsupported(name, "an asymmetric weight")
    n = w_hat.shape[0]
    s = wq.scale.detach().abs().clamp(min=1e-8).double().reshape(-1).expand(n).clone()
    bits = int(wq.bits)
    if bits == 1:
        s = s / 2  # {-s/2, +s/2} -> codes +-1 at s/2
    shape = (n,) + (1,) * (w_hat.dim() - 1)
    codes = torch.round(w_hat.detach().double() / s.reshape(shape))
    lim = 2 ** (bits - 1) if bits > 1 else 1
    if codes.numel() and (codes.min() < -lim or codes.max() > max(lim - 1, 1)):
        raise HawqError(f"op {name}: weight codes outside the {bits}-bit range")
    err = (codes * s.reshape(shape) - w_hat.detach().double()).abs().max()
    if err > 1e-4 * float(s.max()):
        raise HawqError(f"op {name}: the quantized weight is not on its grid (off by {err:.3g})")
    return codes.to(torch.int8), s, bits


def fit_bias(
    codes: Tensor, scale: Tensor, bias: Tensor | None, act: Grid, bits: int
) -> tuple[Tensor, Tensor]:
    """Coarsen the weight scale of channels whose bias would overflow the int32 accumulator.

    The kernel adds ``round(b_n / (s_x s_n))`` to an accumulator bounded by ``A = acc_bound(K)``;
    a dead channel (all-zero weights, scale clamped to ~1e-8) or a BN-folded channel with
    ``gamma ~ 0`` (scale ~ 0, possibly exactly 0) makes that integer astronomically large.
    Such a channel's weights contribute at most ``A s_x |s_n|`` -- nothing next to its bias --
    so it is given the scale ``s'_n = sign(s_n) |b_n| / (s_x B)`` with
    ``B = (2^31 - 1 - A) / 2`` (the bias now takes at most ``B``) and codes
    ``round(w_n s_n / s'_n)`` (mostly 0). The channel's real weights change by at most
    ``s'_n / 2`` each; its output, the bias, is represented to ``|b_n| / B`` relative.

    Returns:
        ``(codes, scale)``, new tensors only where a channel needed it.
    """
    from hawq.integer.dyadic import INT32_MAX, acc_bound

    n = codes.shape[0]
    k = codes[0].numel()
    budget = (INT32_MAX - acc_bound(k, act.bits, max(bits, 2))) // 2
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    s = scale.clone()
    big = b.abs() > budget * act.scale * s.abs()
    zero = s == 0
    if not bool((big | zero).any()):
        return codes, scale
    sign = torch.where(s < 0, -1.0, 1.0)
    new = torch.where(b.abs() > 0, b.abs() / (act.scale * budget), torch.ones_like(s)) * sign
    fix = big | zero
    s = torch.where(fix, new, s)
    lim = 2 ** (bits - 1) if bits > 1 else 1
    shape = (n,) + (1,) * (codes.dim() - 1)
    ratio = (scale / s).reshape(shape)
    recoded = torch.clamp(torch.round(codes.double() * ratio), -lim, max(lim - 1, 1))
    codes = torch.where(fix.reshape(shape), recoded, codes.double()).to(torch.int8)
    return codes, s


def linear_spec(name: str, op: nn.Module) -> WeightSpec:
    """Spec of a :class:`~hawq.quant.QuantLinear`."""
    _expect(op, "QuantLinear", name)
    codes, s, bits = weight_codes(op.w_quant, op.quantized_weight(), name)
    bias = op.bias.detach().double() if op.bias is not None else None
    act = act_grid(op.a_quant, name)
    codes, s = fit_bias(codes, s, bias, act, bits)
    return WeightSpec(name, "linear", codes, s, bits, bias, act)


def conv_spec(name: str, op: nn.Module, bn: nn.Module | None = None) -> WeightSpec:
    """Spec of a :class:`~hawq.quant.QuantConv2d`, folding a following BN left unfolded.

    The wrapper's own folded BN is already in ``Q(W_f)`` and ``b_f``. A separate
    ``BatchNorm2d`` (``bn``) is folded into the per-channel scale exactly:
    ``s'_c = s_c gamma_c / sigma_c`` and ``b'_c = beta_c + (b_c - mu_c) gamma_c / sigma_c``.
    """
    _expect(op, "QuantConv2d", name)
    if op.groups != 1 or tuple(op.dilation) != (1, 1):
        raise _unsupported(name, "a grouped or dilated conv")
    if op.stride[0] != op.stride[1] or op.padding[0] != op.padding[1]:
        raise _unsupported(name, "an anisotropic stride/padding")
    if op.bn is not None and op.training and not bool(op.bn_frozen):
        raise HawqError(f"op {name}: put the model in eval mode before conversion")
    w_f, b_f = op.folded()
    codes, s, bits = weight_codes(op.w_quant, op.quantized_weight(), name)
    bias = b_f.detach().double() if b_f is not None else torch.zeros_like(s)
    if isinstance(bn, nn.BatchNorm2d):
        inv = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = bn.bias.detach().double() + (bias - bn.running_mean.double()) * inv
        s = s * inv
    act = act_grid(op.a_quant, name)
    codes, s = fit_bias(codes, s, bias, act, bits)
    return WeightSpec(
        name, "conv2d", codes, s, bits, bias, act, int(op.stride[0]), int(op.padding[0])
    )


def matmul_spec(name: str, op: nn.Module) -> MatMulSpec:
    """Spec of a :class:`~hawq.quant.QuantMatMul`."""
    _expect(op, "QuantMatMul", name)
    a, b = act_grid(op.a_quant, f"{name} (a)"), act_grid(op.b_quant, f"{name} (b)")
    return MatMulSpec(name, a, b)


def _expect(op: nn.Module, kind: str, name: str) -> None:
    if type(op).__name__ != kind:
        raise HawqError(
            f"op {name}: expected a quantized {kind}, got {type(op).__name__} "
            "(is every op quantized by the plan?)"
        )
