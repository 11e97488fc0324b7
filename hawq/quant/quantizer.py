"""One operand's fake quantizer as a module: static, dynamic, learned (LSQ/LSQ+/PACT) or float.

A :class:`Quantizer` owns the state of one operand (a weight or an activation):
its bit width, integer range and qparams (``scale``, ``zero_point``; learned
parameters when QAT uses LSQ, LSQ+ or PACT). The maths lives in the pure
functions of :mod:`~hawq.quant.primitives`, :mod:`~hawq.quant.formats` and
:mod:`~hawq.quant.learnable`; this class only picks one and holds its state.

Modes: ``quant`` (fake-quantize), ``observe`` (feed a calibrator, pass the input
through unchanged) and ``off`` (identity).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawq.quant.calibrators import make_calibrator, mse_range
from hawq.quant.formats import MINIFLOATS, format_fake_quantize, fp8_scale
from hawq.quant.learnable import (
    lsq_fake_quantize,
    lsq_grad_scale,
    lsqplus_fake_quantize,
    pact_fake_quantize,
)
from hawq.quant.minmax_exact import exact_minmax_fake_quantize
from hawq.quant.primitives import (
    choose_qparams,
    fake_quantize_grouped,
    group_view,
    qrange,
    reduce_range,
    ungroup,
)

Tensor = torch.Tensor
LEARN_METHODS = ("lsq", "lsqplus", "pact")
MIN_SCALE = 1e-8


def qparam_shape(weight: Tensor | None, granularity: str, axis: int, group_size: int) -> tuple:
    """Shape of the scale tensor: () per tensor, keep-dim per channel, (rows, groups, 1)."""
    if weight is None or granularity == "per_tensor":
        return ()
    if granularity == "per_channel":
        return tuple(n if d == axis % weight.dim() else 1 for d, n in enumerate(weight.shape))
    return tuple(group_view(torch.empty(weight.shape, device="meta"), group_size).shape[:2]) + (1,)


class Quantizer(nn.Module):
    """Fake quantizer of one operand.

    Args:
        bits: bit width (1-8).
        fmt: ``int`` or a float format of :mod:`hawq.quant.formats`.
        symmetric: symmetric grid (zero point 0); activations switch to the unsigned
            grid when calibration finds no negative values.
        granularity: ``per_tensor`` / ``per_channel`` / ``per_group`` (weights only).
        axis: channel axis for ``per_channel``.
        group_size: group length for ``per_group`` (and NF4).
        dynamic: ranges from each input (min/max) instead of stored qparams; asymmetric
            dynamic grids follow the seed study's formulas exactly
            (:mod:`hawq.quant.minmax_exact`).
        calibrator: name of the static-range calibrator (see :mod:`hawq.quant.calibrators`).
        learn: None (fixed qparams) or ``lsq`` / ``lsqplus`` / ``pact`` (learned).
        weight: the weight this quantizer will see (fixes the qparam shape); None for
            activations.
        block_axis: the operand's reduction dim, along which MX blocks run.
    """

    def __init__(
        self,
        bits: int,
        fmt: str = "int",
        symmetric: bool = True,
        granularity: str = "per_tensor",
        axis: int = 0,
        group_size: int = 128,
        dynamic: bool = False,
        calibrator: str = "minmax",
        learn: str | None = None,
        weight: Tensor | None = None,
        block_axis: int = -1,
    ) -> None:
        super().__init__()
        self.block_axis = block_axis
        if learn is not None and learn not in LEARN_METHODS:
            raise ValueError(f"learn={learn!r}; allowed: {LEARN_METHODS}")
        self.is_weight = weight is not None
        if self.is_weight and learn == "pact":
            learn = "lsq"  # PACT clips activations; its weights use LSQ step sizes
        if fmt != "int" or dynamic:
            learn = None  # float formats and dynamic ranges have no learned qparams
        self.fmt, self.symmetric, self.granularity = fmt, symmetric, granularity
        self.axis, self.group_size, self.dynamic = axis, group_size, dynamic
        self.calibrator_name, self.learn = calibrator, learn
        self.bits = bits
        self.signed = symmetric
        self.q_min, self.q_max = qrange(bits, symmetric, self.signed)
        self.mode = "quant"
        self.calib = None
        shape = qparam_shape(
            weight,
            granularity
            if fmt == "int"
            else ("per_tensor" if granularity == "per_group" else granularity),
            axis,
            group_size,
        )
        dev = weight.device if weight is not None else None
        scale = torch.ones(shape, device=dev)
        zero = torch.zeros(shape, device=dev)
        if learn in ("lsq", "lsqplus"):
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if learn == "lsqplus":
            self.offset = nn.Parameter(zero.clone())
        if learn == "pact":
            self.alpha = nn.Parameter(torch.ones(shape, device=dev))
        self.register_buffer("zero_point", zero)
        self.register_buffer("ready", torch.tensor(dynamic or fmt in ("nf4", "mxfp4", "mxint8")))

    # ------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits, self.signed = state["bits"], state["signed"]
        self.q_min, self.q_max = qrange(self.bits, self.symmetric, self.signed)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, fmt={self.fmt}, symmetric={self.symmetric}, "
            f"granularity={self.granularity}, dynamic={self.dynamic}, learn={self.learn}"
        )

    def _set_qparams(self, lo: Tensor, hi: Tensor) -> None:
        """Store scale/zero point (or PACT alpha, LSQ+ offset) for the real range [lo, hi]."""
        lo, hi = lo.to(self.zero_point.device), hi.to(self.zero_point.device)
        if self.fmt.startswith("fp8"):
            amax = torch.maximum(-lo, hi)
            self.scale.data.copy_(
                torch.clamp(amax / MINIFLOATS[self.fmt][2], min=1e-12).expand_as(self.scale)
            )
        else:
            scale, zp = choose_qparams(lo, hi, self.bits, self.symmetric, self.signed)
            self.scale.data.copy_(scale.expand_as(self.scale))
            self.zero_point.copy_(zp.expand_as(self.zero_point))
            if self.learn == "lsqplus":
                self.offset.data.copy_((-zp * scale).expand_as(self.offset))
            if self.learn == "pact":
                amax = torch.maximum(-lo, hi) if self.signed else hi
                self.alpha.data.copy_(torch.clamp(amax, min=MIN_SCALE).expand_as(self.alpha))
        self.ready.fill_(True)

    def real_range(self) -> tuple[Tensor, Tensor]:
        """The real interval the current qparams cover."""
        if self.learn == "pact":
            a = self.alpha.detach()
            return (-a if self.signed else torch.zeros_like(a)), a
        s = self.scale.detach().abs()
        if self.learn == "lsqplus":
            b = self.offset.detach()
            return self.q_min * s + b, self.q_max * s + b
        z = self.zero_point
        return (self.q_min - z) * s, (self.q_max - z) * s

    # ------------------------------------------------------------ calibration

    @torch.no_grad()
    def init_from_weight(self, weight: Tensor) -> None:
        """Static qparams of a weight: min/max per group, or MSE-optimal clipping."""
        if self.fmt.startswith("fp8"):
            gran = "per_tensor" if self.granularity == "per_group" else self.granularity
            self.scale.copy_(fp8_scale(weight, self.fmt, gran, self.axis).expand_as(self.scale))
            self.ready.fill_(True)
            return
        if self.fmt != "int":
            return
        if self.calibrator_name == "mse":
            lo, hi = mse_range(
                weight, self.bits, self.symmetric, self.granularity, self.axis, self.group_size
            )
        else:
            lo, hi = reduce_range(weight.detach(), self.granularity, self.axis, self.group_size)
        self._set_qparams(lo, hi)

    def start_observe(self) -> None:
        self.calib = make_calibrator(self.calibrator_name, self.bits, self.symmetric)
        self.mode = "observe"

    @torch.no_grad()
    def finish_observe(self) -> None:
        """Turn the calibrator's range into qparams and switch to ``quant``."""
        calib, self.calib, self.mode = self.calib, None, "quant"
        if calib is None or calib.n_batches == 0:
            return
        if self.symmetric and float(calib.lo) >= 0 and self.bits > 1:
            self.signed = False  # non-negative data: unsigned grid doubles the resolution
            calib.symmetric = True
            self.q_min, self.q_max = qrange(self.bits, self.symmetric, self.signed)
        if self.learn == "pact":
            self.signed = float(calib.lo) < 0
        lo, hi = calib.compute()
        self._set_qparams(lo, hi)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Change the bit width, keeping the covered real range (progressive lowering)."""
        if bits == self.bits:
            return
        was_ready = bool(self.ready)
        lo, hi = self.real_range() if was_ready and not self.dynamic else (None, None)
        self.bits = bits
        self.q_min, self.q_max = qrange(bits, self.symmetric, self.signed)
        if lo is not None and self.fmt == "int":
            if self.granularity == "per_group" or self.scale.dim() > 0:
                lo, hi = lo.expand_as(self.scale), hi.expand_as(self.scale)
            self._set_qparams(lo, hi)

    def collapsed(self) -> bool:
        """True when a qparam is NaN/Inf or a step size/clip is <= ~0 (collapsed to ~0 or
        flipped sign: the forward would run on ``max(|s|, s_min)``, hiding it)."""
        for name in ("scale", "alpha", "offset"):
            t = getattr(self, name, None)
            if t is None:
                continue
            t = t.detach()
            if not torch.isfinite(t).all():
                return True
            if name != "offset" and bool(self.ready) and (t <= MIN_SCALE * 10).any():
                return True
        return False

    # ------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.calib is not None:
                self.calib.observe(x)
            return x
        if self.fmt != "int":
            scale = None if (self.dynamic or not self.fmt.startswith("fp8")) else self.scale
            return format_fake_quantize(
                x, self.fmt, scale, self.granularity, self.axis, self.group_size, self.block_axis
            )
        if self.learn == "pact":
            return pact_fake_quantize(x, self.alpha, self.bits, self.signed)
        grouped = self.granularity == "per_group" and self.is_weight
        if self.dynamic:
            gran = self.granularity if self.is_weight else "per_tensor"
            if not self.symmetric:  # the seed study's min/max: no widening to 0, z unclamped
                return exact_minmax_fake_quantize(x, self.q_max, gran, self.axis, self.group_size)
            lo, hi = reduce_range(x.detach(), gran, self.axis, self.group_size)
            scale, zp = choose_qparams(lo, hi, self.bits, self.symmetric, self.signed)
            return fake_quantize_grouped(
                x, scale, self._zero(zp), self.q_min, self.q_max, gran, self.group_size
            )
        if self.learn is None:
            gran = self.granularity if self.is_weight else "per_tensor"
            return fake_quantize_grouped(
                x,
                self.scale,
                self._zero(self.zero_point),
                self.q_min,
                self.q_max,
                gran,
                self.group_size,
            )
        xv = group_view(x, self.group_size) if grouped else x
        g = self._grad_scale(xv if self.is_weight else x)
        if self.learn == "lsq":
            out = lsq_fake_quantize(
                xv, self.scale, self.q_min, self.q_max, g, self._zero(self.zero_point), MIN_SCALE
            )
        else:
            out = lsqplus_fake_quantize(
                xv, self.scale, self.offset, self.q_min, self.q_max, g, MIN_SCALE
            )
        return ungroup(out, x.shape) if grouped else out

    def _zero(self, zero_point: Tensor) -> Tensor | None:
        """The zero point, or None where it is 0 by construction (symmetric grids, b > 1),
        which saves the fused kernels a pass."""
        return None if self.symmetric and self.bits > 1 else zero_point

    def _grad_scale(self, x: Tensor) -> float:
        """LSQ's ``g = 1/sqrt(N Q_p)``, cached per (shape, Q_p): N is the number of elements
        one step size covers (per sample for activations)."""
        key = (tuple(x.shape), self.q_max)
        cache = self.__dict__.setdefault("_g_cache", {})
        if key not in cache:
            n = x.numel() // max(self.scale.numel(), 1) if self.is_weight else x[0].numel()
            cache[key] = lsq_grad_scale(n, self.q_max)
        return cache[key]
