"""The loss curvature is taken of, on batches of any structure.

hawq's estimators take ``loss_fn`` in one of two forms:

* ``loss_fn(output, target)`` (``F.cross_entropy``...): batches are ``(x, y)`` pairs and
  the loss is ``loss_fn(model(x), y)``, the classic image-classification form;
* a :class:`BatchLoss`, ``BatchLoss(fn)`` with ``fn(model, batch) -> scalar``: batches are
  anything (a dict of token ids and masks, a tuple, a ``transformers`` batch) and ``fn``
  calls the model as it needs, e.g.
  ``BatchLoss(lambda model, batch: model(**batch).loss)``.

Either way the loss must be a *mean* over the batch's samples, and the batch size is
the leading dimension of the batch's tensors (:func:`batch_size`; pass ``batch_size=`` to
:class:`BatchLoss` for anything else). ``model`` inside ``fn`` may be a stand-in callable
(functional evaluations with substituted weights): call it, do not read its attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hawq.batches import batch_size, run_inputs, sample_slice  # noqa: F401 - this module's API
from hawq.models.ops import as_logits

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchLoss:
    """``fn(model, batch) -> scalar``: a mean loss over ``batch``, of any structure.

    Args:
        fn: the loss; it calls ``model`` as the batch needs.
        batch_size: samples of a batch (default :func:`batch_size`).
    """

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], batch_size=None) -> None:
        self.fn = fn
        self._size = batch_size

    def __call__(self, model, batch) -> torch.Tensor:
        return self.fn(model, batch)

    def size(self, batch) -> int:
        return self._size(batch) if self._size is not None else batch_size(batch)

    def __repr__(self) -> str:
        return f"BatchLoss({getattr(self.fn, '__name__', self.fn)!r})"


class _PairLoss(BatchLoss):
    """``loss_fn(model(x), y)`` on ``(x, y)`` batches."""

    def __init__(self, loss_fn: LossFn) -> None:
        super().__init__(self._pair)
        self.loss_fn = loss_fn

    def _pair(self, model, batch) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(as_logits(run_inputs(model, x)), y)

    def size(self, batch) -> int:
        return len(batch[1])


def as_batch_loss(loss_fn: LossFn | BatchLoss) -> BatchLoss:
    """``loss_fn`` as a :class:`BatchLoss` (a two-argument loss reads ``(x, y)`` batches)."""
    return loss_fn if isinstance(loss_fn, BatchLoss) else _PairLoss(loss_fn)


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> Callable:
    """``model`` evaluated with parameters and buffers ``state`` (``functional_call``)."""

    def call(*args, **kwargs):
        return functional_call(model, state, args, kwargs)

    return call
