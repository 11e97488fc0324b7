"""Hessian-vector products of a loss on one batch, restricted to chosen parameters.

For parameters :math:`\\theta = (\\theta_1, \\dots, \\theta_P)`, a batch
:math:`(x, y)` and :math:`L(\\theta) = \\ell(f_\\theta(x), y)`, a backend
computes, for an index set :math:`S` and tangents :math:`v_S`,

.. math::  (H v)_S = \\nabla^2_{\\theta_S} L \\; v_S ,

i.e. the principal sub-block :math:`H_{SS}` applied to :math:`v_S` (all other
parameters held fixed). ``S`` = all parameters gives the full product; ``S`` =
one op's weight and bias gives that op's diagonal block. Two backends:

* :class:`DoubleBackwardHVP` (reverse-over-reverse): build
  :math:`g = \\nabla_\\theta L` once with ``create_graph=True`` and answer every
  product by differentiating :math:`g_S \\cdot v_S` again. On a fixed batch the
  first-order graph is kept and reused, so a product costs one extra backward
  pass through the double graph.
* :class:`FuncHVP` (forward-over-reverse): ``torch.func.jvp`` of
  ``torch.func.grad``; nothing is cached, each product redoes the forward.

Curvature is always taken in eval mode (BatchNorm running statistics, no
dropout): every forward here runs under :func:`evaluating`, which switches the
model to eval and restores each module's mode afterwards, so a model passed in
train mode is analysed in eval mode and its BatchNorm buffers are never
updated (:func:`note_train_mode` says so in the log). Models must not use fused
SDPA attention (no double backward or forward-mode AD).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hawq.hessian.objective import BatchLoss, LossFn, as_batch_loss, with_state

Batch = Any  # (x, y) for a two-argument loss; anything for a BatchLoss

BACKENDS = ("double_backward", "func")
log = logging.getLogger("hawq")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model.eval()``; restore every module's ``training`` flag after.

    Inside, ``F.scaled_dot_product_attention`` (PyTorch's and ``transformers``' default
    attention, ``nn.MultiheadAttention``'s fast path) runs its math kernel: the fused CPU
    flash kernel has no double backward and no forward-mode AD, so second-order products
    through it fail. Only hawq's own passes are affected, not the user's global setting.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def note_train_mode(model: nn.Module, who: str) -> None:
    """Log (warning) that a train-mode model is analysed in eval mode."""
    if any(m.training for m in model.modules()):
        log.warning(
            "hessian: %s: the model is in train mode; its curvature is taken in eval "
            "mode (BatchNorm running statistics, no dropout): each forward runs under "
            "model.eval(), the mode is restored and no buffer is changed",
            who,
        )


def reiterable(batches: Iterable[Batch], who: str) -> Iterable[Batch]:
    """``batches`` itself if it can be iterated again, else (a one-shot iterator or
    generator, which would be exhausted after one pass) its items as a list."""
    if iter(batches) is batches:
        batches = list(batches)
        log.info(
            "hessian: %s: batches is a one-shot iterator; materialised its %d batches "
            "(every product iterates them again)",
            who,
            len(batches),
        )
    return batches


class BatchHVP:
    """Base class: Hessian-vector products of the loss on one batch.

    Args:
        model: the network (eval mode).
        loss_fn: ``loss_fn(output, target) -> scalar`` on ``(x, y)`` batches, or a
            :class:`~hawq.hessian.objective.BatchLoss` on batches of any structure.
        params: parameters of ``model`` that span the Hessian.
        batch: one batch.
    """

    name = "base"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], batch: Batch
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.loss: BatchLoss = as_batch_loss(loss_fn)
        self.params = list(params)
        self.batch = batch

    def __call__(self, vs: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        """:math:`H_{SS} v_S` for ``S = idx``; ``vs[i]`` has the shape of ``params[idx[i]]``."""
        raise NotImplementedError


class DoubleBackwardHVP(BatchHVP):
    """Reverse-over-reverse products reusing one first-order graph.

    The gradient :math:`g = \\nabla_\\theta L` is built once (``create_graph``);
    each call returns :math:`\\nabla_{\\theta_S}(g_S \\cdot v_S) = H_{SS} v_S`
    with ``retain_graph=True``. Entries of :math:`g` that do not depend on the
    parameters (a Hessian block that is identically zero) give zeros.
    """

    name = "double_backward"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], batch: Batch
    ) -> None:
        super().__init__(model, loss_fn, params, batch)
        with torch.enable_grad(), evaluating(model):
            loss = self.loss(model, batch)
            self.grads = torch.autograd.grad(
                loss, self.params, create_graph=True, allow_unused=True
            )

    def __call__(self, vs: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        return self._grad_of_grad(vs, idx, batched=False)

    def batched(self, vs: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        """:math:`H_{SS} [v^{(1)} \\dots v^{(k)}]` in ONE vmapped double backward
        (``is_grads_batched``): ``vs[i]`` has shape ``(k, *params[idx[i]].shape)``. Per
        vector this costs far less than ``k`` separate products (the graph is walked once;
        every node's backward-of-backward runs on a batch of ``k``)."""
        return self._grad_of_grad(vs, idx, batched=True)

    def _grad_of_grad(
        self, vs: Sequence[torch.Tensor], idx: Sequence[int], batched: bool
    ) -> list[torch.Tensor]:
        """Double backward of the kept first-order graph for params ``idx``, batched over
        the leading dim of ``vs`` when ``batched`` (zeros where a param does not reach
        the loss)."""
        live = [
            k
            for k, i in enumerate(idx)
            if self.grads[i] is not None and self.grads[i].requires_grad
        ]
        out = [torch.zeros_like(v) for v in vs]
        if not live:
            return out
        hv = torch.autograd.grad(
            [self.grads[idx[k]] for k in live],
            [self.params[idx[k]] for k in live],
            grad_outputs=[vs[k] for k in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        for k, h in zip(live, hv):
            if h is not None:
                out[k] = h.detach()
        return out


class FuncHVP(BatchHVP):
    """Forward-over-reverse products with ``torch.func``.

    With :math:`\\phi(\\theta_S) = L(\\theta_S, \\theta_{\\bar S})`,
    :math:`H_{SS} v_S = \\partial_t \\nabla\\phi(\\theta_S + t v_S)|_{t=0}`, i.e.
    ``jvp(grad(phi), (theta_S,), (v_S,))``. Buffers (BatchNorm running
    statistics) are passed unchanged.
    """

    name = "func"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], batch: Batch
    ) -> None:
        super().__init__(model, loss_fn, params, batch)
        by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(self.params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"params {missing} are not parameters of the model")
        self.names = [by_id[id(p)] for p in self.params]
        self.fixed = {n: p.detach() for n, p in model.named_parameters()}
        self.fixed.update({n: b for n, b in model.named_buffers()})

    def __call__(self, vs: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        names = [self.names[i] for i in idx]

        def loss_of(sub: tuple[torch.Tensor, ...]) -> torch.Tensor:
            state = dict(self.fixed)
            state.update(zip(names, sub))
            return self.loss(with_state(self.model, state), self.batch)

        primals = tuple(self.params[i].detach() for i in idx)
        with evaluating(self.model):
            _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vs),))
        return [h.detach() for h in hv]


def make_batch_hvp(
    backend: str, model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], batch: Batch
) -> BatchHVP:
    """The backend called ``backend`` (one of :data:`BACKENDS`) on ``batch``."""
    if backend == "double_backward":
        return DoubleBackwardHVP(model, loss_fn, params, batch)
    if backend == "func":
        return FuncHVP(model, loss_fn, params, batch)
    raise ValueError(f"unknown HVP backend {backend!r}; allowed: {', '.join(BACKENDS)}")
