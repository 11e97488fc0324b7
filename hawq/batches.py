"""Batches of any structure: what the stages and libraries do to one, in one place.

A batch is an ``(x, y)`` pair (``model(x)``, ``y`` the labels), a bare input tensor, or a
mapping of keyword inputs (``model(**batch)``: token ids, masks, flags). ``x`` itself may
be a float tensor (images, features) or an integer one (token ids): casts touch floating
tensors only, so ids stay ids when a model runs in float64 or bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from hawq.errors import HawqError


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the leading dimension of its tensors (``(x, y)``: of ``y``)."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return len(batch[1])
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors:
        raise HawqError(f"no tensor with a batch dimension in a {type(batch).__name__} batch")
    return tensors[0].shape[0]


def sample_slice(batch: Any, start: int, stop: int, n: int) -> Any:
    """Samples ``start:stop`` of ``batch``: every tensor whose leading dimension is ``n``
    is sliced, the rest (flags, shared tensors) kept."""
    return tree_map(
        lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() and len(t) == n else t,
        batch,
    )


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of ``batch`` on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """Every *floating* tensor of ``batch`` in ``dtype``; integer ones (token ids, labels,
    masks) kept as they are."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        batch,
    )


def model_inputs(batch: Any) -> Any:
    """The model's inputs in ``batch``: ``x`` of a pair, a mapping or a tensor as it is."""
    if isinstance(batch, Mapping):
        return batch
    return batch[0] if isinstance(batch, tuple | list) else batch


def run_inputs(model: Any, x: Any) -> Any:
    """``model`` on the inputs ``x`` of one ``(x, y)`` batch: ``model(**x)`` for a mapping
    of keyword inputs (token ids and attention masks), ``model(x)`` otherwise."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def call_model(model: Any, batch: Any, device: torch.device | str | None = None) -> Any:
    """``model`` on the inputs of ``batch``: ``model(x)`` for an ``(x, y)`` pair or a
    tensor, ``model(**batch)`` for a mapping (tensors moved to ``device`` when given)."""
    if device is not None:
        batch = to_device(batch, device)
    return run_inputs(model, model_inputs(batch))
