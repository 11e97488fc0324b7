"""First-order curvature: empirical Fisher traces of every op's weight and operands.

For a loss :math:`L = \\frac1N \\sum_i \\ell_i` near a minimum the Hessian is close to the
empirical Fisher :math:`F = \\frac1N \\sum_i g_i g_i^\\top` with per-sample gradients
:math:`g_i = \\nabla \\ell_i` (the Gauss-Newton / Fisher identity for a log-likelihood), and
its block trace needs no second derivative at all:

.. math::  \\mathrm{tr}\\, F_W = \\frac1N \\sum_i \\lVert \\nabla_W \\ell_i \\rVert^2 ,

a plain mean over samples, so its standard error is the sample one (no stop rule, no
probes). Per-sample weight gradients come from ``torch.func`` (``vmap`` of ``grad`` over a
chunk of samples). For an operand :math:`x_k` (the input of a Linear/Conv2d, ``a``/``b``
of a MatMul) samples do not interact in eval mode, so one backward pass of the mean loss
gives every sample's :math:`\\partial \\ell_i / \\partial x_{k,i} = N\\, \\partial L /
\\partial x_{k,i}` at once, and

.. math::  \\mathrm{tr}\\, F_{x_k} = \\frac1N \\sum_i \\lVert \\partial \\ell_i /
           \\partial x_{k,i} \\rVert^2 ,

the per-sample average the allocator reads (as :mod:`hawq.hessian.activation` for the
Hessian). Cost: about one forward+backward per batch for the operands and one vmapped
per-sample backward for the weights, against hundreds of Hessian-vector products. What
it gives up: the Fisher is positive semi-definite and equals the Hessian only where the
model fits the data (``benchmarks/bench_hessian.py`` measures the rank agreement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from hawq.errors import HawqError
from hawq.hessian.activation import Key, tap_operands
from hawq.hessian.hutchinson import TraceEstimate
from hawq.hessian.hvp import evaluating
from hawq.hessian.objective import as_batch_loss, sample_slice, with_state
from hawq.models.ops import quantizable_ops

Batch = Any  # (x, y) for a two-argument loss; anything for a BatchLoss


def _sample_dim(t, n: int) -> int | None:
    """vmap's dimension of one batch leaf: 0 for a tensor of ``n`` samples, else None."""
    return 0 if isinstance(t, torch.Tensor) and t.dim() and len(t) == n else None


def _estimate(values: list[torch.Tensor], numel: int) -> TraceEstimate:
    """Mean and standard error of per-sample values."""
    v = torch.cat(values).double()
    n = v.numel()
    stderr = float(v.std(unbiased=True) / n**0.5) if n > 1 else float("inf")
    return TraceEstimate(float(v.mean()), stderr, n, numel)


def weight_fisher(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable[Batch],
    ops: Mapping[str, nn.Module] | None = None,
    chunk: int = 16,
) -> dict[str, TraceEstimate]:
    """:math:`\\mathrm{tr} F_W` of every op's weight (ops without a trainable weight are
    omitted), from per-sample gradients in chunks of ``chunk`` samples."""
    ops = dict(quantizable_ops(model) if ops is None else ops)
    names = {
        f"{n}.weight": n
        for n, m in ops.items()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad
    }
    if not names:
        return {}
    fixed = {k: v.detach() for k, v in model.named_parameters()}
    fixed.update({k: v for k, v in model.named_buffers()})
    weights = {k: fixed[k] for k in names}

    objective = as_batch_loss(loss_fn)

    def sample_loss(w: dict, sample) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return objective(with_state(model, {**fixed, **w}), one)

    values: dict[str, list[torch.Tensor]] = {n: [] for n in names.values()}
    with evaluating(model), torch.enable_grad():
        for batch in batches:
            n = objective.size(batch)
            dims = tree_map(lambda t, n=n: _sample_dim(t, n), batch)
            per_sample = vmap(grad(sample_loss), in_dims=(None, dims))
            for i in range(0, n, chunk):
                g = per_sample(weights, sample_slice(batch, i, i + chunk, n))
                for key, op in names.items():
                    values[op].append(g[key].flatten(1).pow(2).sum(1).detach())
    return {op: _estimate(v, ops[op].weight.numel()) for op, v in values.items()}


def operand_fisher(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable[Batch],
    ops: Mapping[str, nn.Module] | None = None,
) -> dict[str, dict[str, TraceEstimate]]:
    """:math:`\\mathrm{tr} F_{x_k}` of every op operand (``loss_fn`` a mean over the
    batch; every operand's leading dimension is the sample)."""
    ops = dict(quantizable_ops(model) if ops is None else ops)
    objective = as_batch_loss(loss_fn)
    values: dict[Key, list[torch.Tensor]] = {}
    numel: dict[Key, int] = {}
    with evaluating(model), torch.enable_grad():
        for batch in batches:
            n = objective.size(batch)
            taps: dict[Key, list[torch.Tensor]] = {}
            with tap_operands(ops, taps):
                loss = objective(model, batch)
            keys = list(taps)
            flat = [t for k in keys for t in taps[k]]
            grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
            for k in keys:
                per = torch.zeros(n, dtype=torch.float64, device=loss.device)
                for t in taps[k]:
                    g = next(grads)
                    if t.shape[0] != n:
                        raise HawqError(
                            f"fisher: operand {k[1]} of {k[0]} has leading "
                            f"dimension {t.shape[0]}, not the batch's {n}"
                        )
                    if g is not None:
                        per += (g.double() * n).flatten(1).pow(2).sum(1)
                values.setdefault(k, []).append(per)
                numel[k] = sum(t[0].numel() for t in taps[k])
    out: dict[str, dict[str, TraceEstimate]] = {}
    for (op, operand), v in values.items():
        out.setdefault(op, {})[operand] = _estimate(v, numel[(op, operand)])
    return out
