"""Convert a fake-quant model (``hawq.quant``) into an integer-only graph.

``convert(qmodel, batches)``:

1. reads every quantized op through :mod:`hawq.integer.adapter` (int8 / int4 weight codes,
   per-channel scales, BN folded, the activation grids the fake-quant model calibrated);
2. runs a few calibration batches through the fake-quant model to size the formats it
   leaves in float (residual stream, GELU input, logits; :mod:`hawq.integer.calibrate`);
3. builds :class:`~hawq.integer.vit.IntegerViT` or :class:`~hawq.integer.resnet.IntegerResNet`,
   whose layers hold only integers (weights, int32 biases at ``s_w s_x``, dyadic
   requantizers) and run through :mod:`hawq.integer.ops`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer import resnet as iresnet
from hawq.integer import vit as ivit
from hawq.integer.calibrate import observe_absmax
from hawq.models.resnet import ResNet
from hawq.models.vit import ViT


@torch.no_grad()
def convert(
    qmodel: nn.Module,
    batches: Iterable,
    residual_bits: int = 16,
    pack_int4: bool = True,
    max_batches: int = 4,
    margin: float = 1.25,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Integer-only model equivalent to the fake-quant ``qmodel``.

    Args:
        qmodel: a ViT or ResNet whose ops ``hawq.quant.quantize_`` replaced and calibrated.
        batches: calibration batches (``(x, y)`` or ``x``) for the extra ranges.
        residual_bits: bits of the residual stream (8-24; int32 storage).
        pack_int4: store <= 4-bit weights two per byte.
        max_batches: calibration batches to use.
        margin: widening of the calibrated ranges.
        device: where the calibration inputs go.

    Returns:
        The integer model (eval mode, on the CPU): ``model(images)`` gives float logits,
        ``model.forward_int`` is the integer-only graph.
    """
    if not 8 <= residual_bits <= 24:
        raise HawqError(f"residual_bits={residual_bits} is invalid; allowed: 8-24")
    qmodel.eval()
    if isinstance(qmodel, ViT):
        mod = ivit
        cls = ivit.IntegerViT
    elif isinstance(qmodel, ResNet):
        mod = iresnet
        cls = iresnet.IntegerResNet
    else:
        raise HawqError(f"no integer conversion for {type(qmodel).__name__}; "
                        "supported: hawq.models.ViT, hawq.models.ResNet")  # fmt: skip
    found = observe_absmax(qmodel, batches, mod.calibration_points(qmodel), max_batches, device)
    ranges = mod.reduce_ranges(found, margin)
    cpu = _cpu_copy(qmodel)
    return cls(cpu, ranges, residual_bits, pack_int4).eval()


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().eval()
