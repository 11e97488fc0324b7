"""LayerNorm -> Linear channel equalization: per-channel activation ranges at per-tensor cost.

A post-LayerNorm activation (the input of ``qkv``, ``fc1`` and the head in a pre-norm ViT)
has channels whose ranges differ by an order of magnitude; one per-tensor grid sized for the
widest channel leaves the others a few codes at 4 bits. For each channel ``j`` with calibrated
centre ``c_j`` and half-range ``r_j`` at the consumer's input, the exact reparametrisation::

    y'_j = (y_j - c_j) / a_j + c        a_j = (r_j / r)^alpha,  r = mean_j r_j,  c = mean_j c_j
    LayerNorm:  gamma'_j = gamma_j / a_j,   beta'_j = (beta_j - c_j) / a_j + c
    consumer:   W' = W diag(a),             b' = b + W (c_vec - a c)

leaves the FP function unchanged (up to float rounding) and, at ``alpha = 1``, gives every
channel of ``y'`` the same range ``[c - r, c + r]``: a per-tensor activation grid then acts as
a per-channel one (the scale reparameterisation of RepQ-ViT, Li et al. 2023). The price moves to
the weights: column ``j`` of ``W`` grows by ``a_j`` (per-output-channel weight grids absorb part
of it); ``alpha`` in ``[0, 1]`` splits the difficulty (``alpha = 0``: no change). The model stays
an ordinary ViT (other LayerNorm and weight values), so integer conversion and export need
nothing new. Models without LayerNorm -> Linear pairs are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from hawq.batches import call_model

log = logging.getLogger("hawq")
Tensor = torch.Tensor


def ln_consumers(model: nn.Module) -> list[tuple[str, nn.LayerNorm, str, nn.Linear]]:
    """``(norm name, norm, consumer name, consumer)`` pairs where the consumer reads only the
    norm's output: ``blocks.i.norm1 -> attn.qkv``, ``blocks.i.norm2 -> mlp.fc1``, ``norm ->
    head`` in :class:`hawq.models.vit.ViT`; empty for other models."""
    pairs = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        # only hawq's own block layout is known to feed the norm to exactly this Linear; any
        # other spelling (an nn.Sequential MLP, nn.MultiheadAttention) is left alone
        qkv = getattr(getattr(blk, "attn", None), "qkv", None)
        fc1 = getattr(getattr(blk, "mlp", None), "fc1", None)
        if isinstance(getattr(blk, "norm1", None), nn.LayerNorm) and qkv is not None:
            pairs.append((f"blocks.{i}.norm1", blk.norm1, f"blocks.{i}.attn.qkv", qkv))
        if isinstance(getattr(blk, "norm2", None), nn.LayerNorm) and fc1 is not None:
            pairs.append((f"blocks.{i}.norm2", blk.norm2, f"blocks.{i}.mlp.fc1", fc1))
    if isinstance(getattr(model, "norm", None), nn.LayerNorm) and isinstance(
        getattr(model, "head", None), nn.Linear
    ):
        pairs.append(("norm", model.norm, "head", model.head))
    return [p for p in pairs if isinstance(p[3], nn.Linear) and p[1].elementwise_affine]


@torch.no_grad()
def channel_ranges(
    model: nn.Module, consumers: list[nn.Linear], batches: Iterable, max_batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Per-channel (min, max) of each consumer's input over ``max_batches`` batches."""
    stats: list[list[Tensor | None]] = [[None, None] for _ in consumers]

    def hook(k: int):
        def fn(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            lo, hi = x.amin(0), x.amax(0)
            s = stats[k]
            s[0] = lo if s[0] is None else torch.minimum(s[0], lo)
            s[1] = hi if s[1] is None else torch.maximum(s[1], hi)

        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(consumers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for n, batch in enumerate(batches):
            if n >= max_batches:
                break
            call_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(s[0] is None for s in stats):
        raise ValueError("equalize: no calibration batch reached every consumer")
    return [(s[0], s[1]) for s in stats]  # type: ignore[misc]


@torch.no_grad()
def equalize_pair(
    norm: nn.LayerNorm, linear: nn.Linear, lo: Tensor, hi: Tensor, alpha: float
) -> Tensor:
    """Apply the reparametrisation of the module docstring to one pair in place; returns
    ``a`` (the per-channel factors)."""
    centre, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)
    a = (half / half.mean()).pow(alpha)
    c = centre.mean()
    dt = norm.weight.dtype
    gamma, beta = norm.weight.double(), norm.bias.double()
    norm.weight.copy_((gamma / a).to(dt))
    norm.bias.copy_(((beta - centre) / a + c).to(dt))
    w = linear.weight.double()
    shift = w @ (centre - a * c)
    linear.weight.copy_((w * a).to(dt))
    if linear.bias is None:
        linear.bias = nn.Parameter(shift.to(dt))
    else:
        linear.bias.copy_((linear.bias.double() + shift).to(dt))
    return a


def equalize_(model: nn.Module, batches: Iterable, alpha: float, max_batches: int = 4) -> dict:
    """Equalize every LayerNorm -> Linear pair of ``model`` (FP, before ``quantize_``) with
    strength ``alpha``; returns ``{consumer: max a / min a}`` (how uneven the channels were)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"equalize: alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:  # the default: nothing to look at
        return {}
    pairs = ln_consumers(model)
    if not pairs:
        return {}
    ranges = channel_ranges(model, [p[3] for p in pairs], batches, max_batches)
    spread = {}
    for (_, norm, cname, lin), (lo, hi) in zip(pairs, ranges, strict=True):
        a = equalize_pair(norm, lin, lo.to(norm.weight.device), hi.to(norm.weight.device), alpha)
        spread[cname] = float(a.max() / a.min())
    log.info(
        "equalize: %d LayerNorm -> Linear pairs, alpha %.2f, channel factor spread "
        "median %.1f (max/min of a)",
        len(pairs),
        alpha,
        float(torch.tensor(list(spread.values())).median()),
    )
    return spread
