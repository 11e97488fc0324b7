"""Batch-norm folding: merge a BatchNorm2d into the conv that feeds it.

With BN statistics ``mu, sigma^2`` (``sigma = sqrt(var + eps)``), scale ``gamma`` and
shift ``beta``, ``BN(conv(x; W, b)) = conv(x; W_f, b_f)`` in eval mode, where::

    W_f = W * gamma / sigma          (per output channel)
    b_f = beta + (b - mu) * gamma / sigma

Folded-BN QAT (Jacob et al. 2018; Krishnamoorthi 2018; MQBench's deployable
setting) quantizes ``W_f`` built from the *running* ``sigma``; before BN is
frozen, the conv output is rescaled by ``sigma / sigma_B`` and shifted with the
batch mean so the layer still normalises with batch statistics (see
:class:`hawq.quant.modules.QuantConv2d`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("hawq")
Tensor = torch.Tensor


def fold_factor(gamma: Tensor, var: Tensor, eps: float) -> Tensor:
    """``gamma / sigma``: the per-output-channel factor folding multiplies the weight by."""
    return gamma / torch.sqrt(var + eps)


def unfold_weight(w_f: Tensor, bn: nn.BatchNorm2d, fallback: Tensor) -> Tensor:
    """The unfolded weight that folds (running statistics) to ``w_f``; ``fallback`` in the
    channels whose factor is 0 (every weight there folds to 0)."""
    scale = fold_factor(bn.weight, bn.running_var, bn.eps)
    shape = (-1,) + (1,) * (w_f.dim() - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).view(shape)
    return torch.where(scale.view(shape) == 0, fallback, w_f / safe)


def fold_weight_bias(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor,
    beta: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(W_f, b_f)`` of the formula above; differentiable in every argument."""
    inv = fold_factor(gamma, var, eps)  # (C_out,)
    w_f = weight * inv.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bias if bias is not None else torch.zeros_like(mean)
    return w_f, beta + (b - mean) * inv


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv (with bias) equal to ``bn(conv(x))`` in eval mode; inputs unchanged."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device)
    w, b = fold_weight_bias(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    )
    fused.weight.copy_(w)
    fused.bias.copy_(b)
    return fused


def _fx_pairs(model: nn.Module) -> dict[str, str] | None:
    """conv name -> bn name for every BN fed only by a conv, via torch.fx; None if untraceable."""
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # dynamic control flow: fall back to names
        log.debug("fx trace failed (%s); pairing conv/bn by name", e)
        return None
    mods = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        is_conv = isinstance(mods.get(getattr(src, "target", None)), nn.Conv2d)
        if getattr(src, "op", None) == "call_module" and is_conv and len(src.users) == 1:
            pairs[src.target] = node.target
    return pairs


def _name_pairs(model: nn.Module) -> dict[str, str]:
    """Fallback: ``x.convK`` -> ``x.bnK`` and ``x.0`` -> ``x.1`` (downsample Sequentials)."""
    mods = dict(model.named_modules())
    pairs = {}
    for name, m in mods.items():
        if not isinstance(m, nn.Conv2d):
            continue
        prefix, _, leaf = name.rpartition(".")
        cands = [leaf.replace("conv", "bn", 1)] if "conv" in leaf else []
        if leaf.isdigit():
            cands.append(str(int(leaf) + 1))
        for c in cands:
            bn_name = f"{prefix}.{c}" if prefix else c
            if isinstance(mods.get(bn_name), nn.BatchNorm2d):
                pairs[name] = bn_name
                break
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module name -> the BatchNorm2d that directly consumes it (and nothing else does)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return {}
    pairs = _fx_pairs(model)
    return pairs if pairs is not None else _name_pairs(model)
