"""The hand-written integer ResNet that hawq shipped before the graph converter: the
oracle the generic path (:mod:`hawq.integer.graph`) must equal bit for bit (issue 30).

Integer-only CIFAR ResNet (the graph of :class:`hawq.models.resnet.ResNet` on integers).

BatchNorms are folded into the convs' per-channel scales and int32 biases (by
``hawq.quant`` or here). The residual stream is int32 holding ``rb``-bit values
(``R = 2^(rb-1) - 1``, default rb = 16) at one scale ``s_r``::

    image --Q(conv1 grid)--> int8
    x = clamp(requant(conv1), 0, R)                          stem (conv+BN+ReLU) at s_r
    block: h = requant(x -> conv1 grid)                       int8
           h = requant_relu(conv1(h) -> conv2 grid)           int8, ReLU = clamp at the zero point
           x = clamp(requant(conv2(h)) + shortcut(x), 0, R)   add + ReLU at s_r
    shortcut (option A): x[:, :, ::2, ::2] zero-padded in channels (0 is exact at s_r)
    pooled = floor((sum_{h,w} x + HW/2) / HW)                 integer mean at s_r (rb bits)
    logits = requant(fc(requant(pooled -> fc grid)))          int32 at s_logit
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hawq.integer import adapter
from hawq.integer.layers import (
    WIDE,
    IntConv2d,
    IntegerModel,
    IntRequant,
    residual_format,
)

from .handwritten_vit import logit_head

Tensor = torch.Tensor


def _bn(module: nn.Module) -> nn.Module | None:
    """A BatchNorm left unfolded after the conv (None when folded: ``nn.Identity``)."""
    return module if isinstance(module, nn.BatchNorm2d) else None


class IntBasicBlock(nn.Module):
    """Integer BasicBlock (see the module docstring)."""

    def __init__(self, block: nn.Module, prefix: str, s_r: float, rb: int,
                 pack_int4: bool) -> None:  # fmt: skip
        super().__init__()
        c1 = adapter.conv_spec(f"{prefix}.conv1", block.conv1, _bn(block.bn1))
        c2 = adapter.conv_spec(f"{prefix}.conv2", block.conv2, _bn(block.bn2))
        self.limit = 2 ** (rb - 1) - 1
        self.in_rq = IntRequant.to_grid(s_r, c1.act)
        self.conv1 = IntConv2d(c1, IntRequant.to_grid(c1.act.scale * c1.scale, c2.act, relu=True),
                               pack_int4)  # fmt: skip
        self.conv2 = IntConv2d(c2, IntRequant(c2.act.scale * c2.scale / s_r, 0, -WIDE, WIDE,
                                              torch.int32), pack_int4)  # fmt: skip
        self.stride, self.pad = block.stride, block.pad

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.in_rq(x.movedim(1, -1)).movedim(-1, 1))
        return self.conv2(h, self.shortcut(x), self.limit, relu=True)  # add + ReLU fused


class IntegerResNet(IntegerModel):
    """Integer-only ResNet built from a fake-quant :class:`~hawq.models.resnet.ResNet`.

    Args:
        qmodel: the fake-quant ResNet (every conv/fc quantized by ``hawq.quant``).
        ranges: ``residual`` and ``logits`` absmax (from calibration).
        residual_bits: bits of the residual stream.
        pack_int4: store <= 4-bit weights two per byte.
    """

    def __init__(self, qmodel: nn.Module, ranges: dict[str, float], residual_bits: int = 16,
                 pack_int4: bool = True) -> None:  # fmt: skip
        super().__init__()
        rb = residual_bits
        self.limit, self.s_r = residual_format(ranges["residual"], rb)
        s_r = self.s_r
        stem = adapter.conv_spec("conv1", qmodel.conv1, _bn(qmodel.bn1))
        self.in_grid = stem.act
        self.conv1 = IntConv2d(stem, IntRequant(stem.act.scale * stem.scale / s_r, 0, 0,
                                                self.limit, torch.int32), pack_int4)  # fmt: skip
        blocks = []
        for li in (1, 2, 3):
            for bi, blk in enumerate(getattr(qmodel, f"layer{li}")):
                blocks.append(IntBasicBlock(blk, f"layer{li}.{bi}", s_r, rb, pack_int4))
        self.blocks = nn.ModuleList(blocks)
        fc = adapter.linear_spec("fc", qmodel.fc)
        self.pool_rq = IntRequant.to_grid(s_r, fc.act)
        self.fc, self.logit_scale = logit_head(fc, ranges["logits"], pack_int4)

    def quantize_input(self, images: Tensor) -> Tensor:
        """(B, C, H, W) float -> int8 on the stem conv's grid."""
        return self.in_grid.quantize(images)

    def forward_int(self, x: Tensor) -> Tensor:
        """int8 image codes -> int32 logits at :attr:`logit_scale` (integer-only)."""
        x = self.conv1(x)  # (B, C, H, W) int32 at s_r, ReLU'd
        for block in self.blocks:
            x = block(x)
        hw = x.shape[2] * x.shape[3]
        pooled = torch.div(x.to(torch.int64).sum(dim=(2, 3)) + hw // 2, hw,
                           rounding_mode="floor")  # (B, C) mean at s_r
        return self.fc(self.pool_rq(pooled))


def calibration_points(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Residual stream = every block input and the last block's output; the logits."""
    points = {"logits": ("fc", "output"), "res.out": ("layer3", "output")}
    for li in (1, 2, 3):
        for bi in range(len(getattr(model, f"layer{li}"))):
            points[f"res.{li}.{bi}"] = (f"layer{li}.{bi}", "input")
    return points


def reduce_ranges(found: dict[str, float], margin: float = 1.25) -> dict[str, float]:
    out = {"residual": margin * max(v for k, v in found.items() if k.startswith("res.")),
           "logits": 2 * found["logits"]}  # fmt: skip
    return {k: (v if math.isfinite(v) and v > 0 else 1.0) for k, v in out.items()}
