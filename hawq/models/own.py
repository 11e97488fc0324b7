"""The user's own model from a config: built, then made hawq-ready by :func:`prepare`.

A ``model`` config group for any image classifier::

    _target_: hawq.models.own.prepared
    model:                         # the user's model, built by Hydra first
      _target_: my_package.MyNet
      width: 64
    input_shape: [3, 32, 32]       # one example image (C, H, W); the batch is added
    min_share: 1.0                 # fail if less of the product FLOPs is captured

Every stage (train, hessian, alloc, ptq, qat, evaluate, export) then sees named ops for
every matrix product. Checkpoints store this config, so :func:`hawq.checkpoint.load_model`
rebuilds and re-prepares the same model (the rewrite is deterministic) before loading the
weights: nothing but tensors is pickled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.models.capture import CaptureReport, prepare

log = logging.getLogger("hawq")


def prepared(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    min_share: float = 1.0,
    example_batch: int = 2,
) -> nn.Module:
    """``model`` prepared on a random example batch of ``input_shape``.

    Args:
        model: the user's model (any ``nn.Module`` taking one image tensor).
        input_shape: one example input without the batch dimension.
        min_share: least captured share of the product FLOPs; below it, one error line
            names what stays float (1.0: nothing may be left out).
        example_batch: rows of the example batch.

    Returns:
        The prepared model; its :class:`~hawq.models.capture.CaptureReport` is at
        ``model.hawq_capture``.
    """
    if not isinstance(model, nn.Module):
        raise HawqError(
            f"bad config model.model: built a {type(model).__name__}, allowed: an "
            "nn.Module (a _target_ to a model class or factory)"
        )
    if not 0.0 <= min_share <= 1.0:
        raise HawqError(f"bad config model.min_share={min_share}: allowed 0 <= min_share <= 1")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, *input_shape, generator=gen)
    was_training = model.training
    out, report = prepare(model.eval(), example, inplace=True)
    out.train(was_training)
    _check_share(report, min_share, type(model).__name__)
    out.hawq_capture = report
    log.info("prepared %s: %s", type(model).__name__, report.summary().splitlines()[0])
    return out


def _check_share(report: CaptureReport, min_share: float, name: str) -> None:
    if report.share + 1e-12 < min_share:
        left = "; ".join(str(x) for x in report.left_out)
        raise HawqError(
            f"{name}: {report.share:.1%} of the product FLOPs captured, below "
            f"model.min_share={min_share}; left float: {left}"
        )
