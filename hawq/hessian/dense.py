"""Dense Hessians with ``torch.func.hessian``: the oracle for tests on tiny models.

Never use these on real models: the Hessian over :math:`n` parameters has
:math:`n^2` entries and costs :math:`O(n)` products.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hawq.hessian.hvp import Batch, LossFn
from hawq.hessian.objective import as_batch_loss, with_state


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """:math:`\\bar H = \\sum_b n_b \\nabla^2_\\theta L_b / \\sum_b n_b` over ``params`` (flattened,
    concatenated in order), as an (n, n) matrix."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    sizes = [p.numel() for p in params]
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update(dict(model.named_buffers()))
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    total, count = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype), 0
    objective = as_batch_loss(loss_fn)
    for batch in batches:

        def loss_of(flat: torch.Tensor, batch=batch) -> torch.Tensor:
            s = dict(state)
            for n, p, chunk in zip(names, params, flat.split(sizes)):
                s[n] = chunk.view_as(p)
            return objective(with_state(model, s), batch)

        n = objective.size(batch)
        total = total + n * torch.func.hessian(loss_of)(flat0).detach().cpu()
        count += n
    return total / count


def dense_activation_hessian(
    model: nn.Module, loss_fn: LossFn, batch: Batch, module: nn.Module, operand: int = 0
) -> torch.Tensor:
    """Hessian of the batch loss w.r.t. operand ``operand`` of ``module``'s input, flattened.

    The operand is replaced (through a forward pre-hook) by a free variable
    :math:`z` and :math:`\\nabla_z^2 L` is taken at the value the forward pass
    produces; only this use of the activation is perturbed.
    """
    objective = as_batch_loss(loss_fn)
    seen: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda m, args: seen.append(args[operand].detach()))
    with torch.no_grad():
        objective(model, batch)
    h.remove()
    z0 = seen[0]

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        def swap(m: nn.Module, args: tuple) -> tuple:
            return args[:operand] + (z,) + args[operand + 1 :]

        handle = module.register_forward_pre_hook(swap)
        try:
            return objective(model, batch)
        finally:
            handle.remove()

    hess = torch.func.hessian(loss_of)(z0)
    return hess.reshape(z0.numel(), z0.numel()).detach()
