"""Quantized replacements of the quantizable ops: Linear, Conv2d (+ folded BN), MatMul.

Each wrapper keeps the op's name in the model (``is_quantizable_op = True``,
``op_kind``), its ``weight``/``bias`` parameters, and one :class:`Quantizer` per
operand: ``w_quant`` (weights) and ``a_quant`` (the input activation), or
``a_quant``/``b_quant`` (both activation operands of a MatMul). An operand whose
bits are None gets no quantizer and stays FP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hawq.quant.bn_fold import fold_weight_bias
from hawq.quant.plan import OpSetting
from hawq.quant.quantizer import Quantizer

Tensor = torch.Tensor


def weight_quantizer(
    setting: OpSetting, weight: Tensor, learn: str | None, block_axis: int = -1
) -> Quantizer | None:
    """The weight quantizer of a setting (per its granularity, output channel = axis 0;
    MX blocks along ``block_axis``, the reduction dim).

    Dynamic (range from the weight at every call) under QAT ``ste`` and when the setting is
    ``dynamic``: the seed study recomputes both operands' qparams before every product."""
    if setting.w_bits is None:
        return None
    return Quantizer(
        setting.w_bits,
        setting.w_format,
        setting.symmetric,
        setting.granularity,
        0,
        setting.group_size,
        dynamic=learn == "ste" or setting.dynamic,
        calibrator=setting.calibrator,
        learn=_learn(learn),
        weight=weight,
        block_axis=block_axis,
    )


def act_quantizer(setting: OpSetting, learn: str | None, block_axis: int = -1) -> Quantizer | None:
    """A per-tensor activation quantizer (dynamic or calibrated, per the setting); MX
    blocks along ``block_axis``, the dim the consuming op reduces over."""
    if setting.a_bits is None:
        return None
    return Quantizer(
        setting.a_bits,
        setting.a_format,
        setting.a_symmetric,
        "per_tensor",
        dynamic=setting.dynamic,
        calibrator=setting.calibrator,
        learn=_learn(learn),
        group_size=setting.group_size,
        block_axis=block_axis,
    )


def _learn(method: str | None) -> str | None:
    return method if method in ("lsq", "lsqplus", "pact") else None


def _q(quant: Quantizer | None, x: Tensor) -> Tensor:
    return x if quant is None else quant(x)


class QuantLinear(nn.Module):
    """``linear(Q_a(x), Q_w(W), b)``."""

    is_quantizable_op = True
    op_kind = "linear"

    def __init__(self, linear: nn.Linear, setting: OpSetting, method: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.setting = setting
        self.w_quant = weight_quantizer(setting, self.weight, method)
        self.a_quant = act_quantizer(setting, method)

    def quantized_weight(self) -> Tensor:
        return _q(self.w_quant, self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_q(self.a_quant, x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Module):
    """``conv2d(Q_a(x), Q_w(W))``, optionally with a BatchNorm folded into ``W`` (and ``b``).

    With ``bn``: the weight that is quantized is ``W_f = W gamma / sigma_run``. In training
    before :attr:`bn_frozen`, batch statistics ``mu_B, sigma_B`` of ``conv(x, W)`` (a
    second, FP conv) update the running ones and the output is
    ``conv(x, Q(W_f)) * sigma_run / sigma_B + beta - gamma mu_B / sigma_B`` (+ the conv bias),
    i.e. BN with batch statistics. Frozen or in eval: ``conv(x, Q(W_f)) + b_f`` with running
    statistics, the deployed form.
    """

    is_quantizable_op = True
    op_kind = "conv2d"

    def __init__(
        self,
        conv: nn.Conv2d,
        setting: OpSetting,
        method: str | None = None,
        bn: nn.BatchNorm2d | None = None,
    ) -> None:
        super().__init__()
        for key in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
        ):
            setattr(self, key, getattr(conv, key))
        if conv.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports padding_mode='zeros' only")
        self.weight = conv.weight
        self.bias = conv.bias
        self.bn = bn
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._frozen = (-1, False)  # (buffer version, value): host copy of bn_frozen
        self.register_load_state_dict_post_hook(QuantConv2d._refresh_frozen)
        self.setting = setting
        w0 = self.folded()[0].detach() if bn is not None else self.weight.detach()
        self.w_quant = weight_quantizer(setting, w0, method, block_axis=1)  # (out, in, kh, kw)
        self.a_quant = act_quantizer(setting, method, block_axis=1)  # (N, C, H, W)

    @staticmethod
    def _refresh_frozen(module: QuantConv2d, _keys=None) -> None:
        module._frozen = (module.bn_frozen._version, bool(module.bn_frozen))

    def freeze_bn(self) -> None:
        """Use the running statistics from now on (the deployed form)."""
        self.bn_frozen.fill_(True)
        self._refresh_frozen(self)

    def is_bn_frozen(self) -> bool:
        """``bn_frozen`` without a device sync per step: re-read only after the buffer
        changed (any in-place write, ``load_state_dict`` included, bumps its version).
        Under ``torch.compile`` the host copy is used as is (a guarded constant)."""
        if torch.compiler.is_compiling():
            return self._frozen[1]
        version = self.bn_frozen._version
        if self._frozen[0] != version:
            self._frozen = (version, bool(self.bn_frozen))
        return self._frozen[1]

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def folded(self) -> tuple[Tensor, Tensor | None]:
        """``(W_f, b_f)`` with running statistics, or ``(W, b)`` without BN."""
        if self.bn is None:
            return self.weight, self.bias
        bn = self.bn
        return fold_weight_bias(
            self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )

    def quantized_weight(self) -> Tensor:
        return _q(self.w_quant, self.folded()[0])

    def forward(self, x: Tensor) -> Tensor:
        x = _q(self.a_quant, x)
        w_f, b_f = self.folded()
        w_q = _q(self.w_quant, w_f)
        if self.bn is None or not self.training or self.is_bn_frozen():
            return self._conv(x, w_q, b_f)
        bn = self.bn
        sigma_run = torch.sqrt(bn.running_var + bn.eps).clone()  # the sigma folded into w_f
        y_fp = self._conv(x, self.weight, None)  # (B, C, H, W) for the batch statistics
        mean_b = y_fp.mean(dim=(0, 2, 3))
        var_b = y_fp.var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            n = y_fp.numel() / y_fp.shape[1]
            m = bn.momentum if bn.momentum is not None else 0.1
            b0 = self.bias.detach() if self.bias is not None else 0.0
            bn.running_mean.mul_(1 - m).add_(m * (mean_b.detach() + b0))
            bn.running_var.mul_(1 - m).add_(m * var_b.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked += 1
        sigma_b = torch.sqrt(var_b + bn.eps)
        y = self._conv(x, w_q, None) * (sigma_run / sigma_b).reshape(1, -1, 1, 1)
        shift = bn.bias - bn.weight * mean_b / sigma_b
        return y + shift.reshape(1, -1, 1, 1)


class QuantMatMul(nn.Module):
    """``Q_a(a) @ Q_b(b)``: both activation operands quantized with the op's ``a_bits``."""

    is_quantizable_op = True
    op_kind = "matmul"

    def __init__(self, setting: OpSetting, method: str | None = None) -> None:
        super().__init__()
        self.setting = setting
        self.a_quant = act_quantizer(setting, method, block_axis=-1)  # a (..., M, K)
        self.b_quant = act_quantizer(setting, method, block_axis=-2)  # b (..., K, N)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(_q(self.a_quant, a), _q(self.b_quant, b))
