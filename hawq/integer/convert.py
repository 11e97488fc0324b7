"""Convert a fake-quant model (``hawq.quant``) into an integer-only graph.

``convert(qmodel, batches)`` works on any model whose ops ``hawq.quant`` quantized (hawq's
ViT and ResNet, or the user's own after :func:`hawq.models.prepare`): it traces the model,
reads every quantized op through :mod:`hawq.integer.adapter` (int8 / int4 weight codes,
per-channel scales, BN folded, the calibrated activation grids), sizes the formats the
fake-quant model leaves in float (residual stream, GELU inputs, logits) on a few
calibration batches and lowers the graph to integer steps that run through
:mod:`hawq.integer.ops` (:mod:`hawq.integer.graph`). A node with no integer form ends the
conversion with one line naming it and where it sits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer.graph.convert import IntegerGraph, convert_graph


@torch.no_grad()
def convert(
    qmodel: nn.Module,
    batches: Iterable,
    residual_bits: int = 16,
    pack_int4: bool = True,
    max_batches: int = 4,
    margin: float = 1.25,
    device: torch.device | str | None = None,
    float_islands: bool = False,
) -> IntegerGraph:
    """Integer-only model equivalent to the fake-quant ``qmodel``.

    Args:
        qmodel: a model whose ops ``hawq.quant.quantize_`` replaced and calibrated.
        batches: calibration batches (``(x, y)`` or ``x``) for the extra ranges.
        residual_bits: bits of the residual stream (8-24; int32 storage).
        pack_int4: store <= 4-bit weights two per byte.
        max_batches: calibration batches to use.
        margin: widening of the calibrated ranges.
        device: unused (calibration runs on a CPU copy); kept for callers that pass it.
        float_islands: leave ops with no integer form in float between a dequantize and a
            quantize (:mod:`hawq.integer.graph.islands`) instead of failing; the model's
            ``float_ops`` lists them.

    Returns:
        The integer model (eval mode, on the CPU): ``model(images)`` gives float logits,
        ``model.forward_int`` is the integer-only graph.
    """
    if not 8 <= residual_bits <= 24:
        raise HawqError(f"residual_bits={residual_bits} is invalid; allowed: 8-24")
    return convert_graph(
        qmodel, batches, residual_bits, pack_int4, max_batches, margin, float_islands=float_islands
    )
