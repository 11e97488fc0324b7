"""The user's own model from a config: built, then made hawq-ready by :func:`prepare`.

A ``model`` config group for any image classifier::

    _target_: hawq.models.own.prepared
    model:                         # the user's model, built by Hydra first
      _target_: my_package.MyNet
      width: 64
    input_shape: [3, 32, 32]       # one example image (C, H, W); the batch is added
    min_share: 1.0                 # fail if less of the product FLOPs is captured

A model taking token ids (a ``transformers`` BERT, an embedding-first network) says so:
``input_dtype: int64`` and ``vocab_size: 30522`` draw the example's ids uniformly from
``[0, vocab_size)`` (``input_shape: [128]``: one sequence of 128 tokens). A model called with
keyword inputs (``model(input_ids=..., attention_mask=...)``, samples whose input is a dict)
lists them instead (:mod:`hawq.models.examples`)::

    inputs:
      input_ids: {shape: [128], dtype: int64, vocab_size: 30522}
      attention_mask: {shape: [128], dtype: int64, vocab_size: 2}

Every stage (train, hessian, alloc, ptq, qat, evaluate, export) then sees named ops for
every matrix product. Checkpoints store this config, so :func:`hawq.checkpoint.load_model`
rebuilds and re-prepares the same model (the rewrite is deterministic) before loading the
weights: nothing but tensors is pickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hawq.errors import HawqError
from hawq.models.capture import CaptureReport, prepare
from hawq.models.examples import EXAMPLE_ATTR, ExampleSpec, input_spec, keyword_spec

log = logging.getLogger("hawq")


def prepared(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    min_share: float = 1.0,
    example_batch: int = 2,
    input_dtype: str = "float32",
    vocab_size: int | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``model`` prepared on a random example batch of ``input_shape``.

    Args:
        model: the user's model (any ``nn.Module`` taking one image tensor).
        input_shape: one example input without the batch dimension.
        min_share: least captured share of the product FLOPs; below it, one error line
            names what stays float (1.0: nothing may be left out).
        example_batch: rows of the example batch.
        input_dtype: the example's dtype: a float type (standard normal values) or an
            integer type (token ids, needs ``vocab_size``).
        vocab_size: integer examples are drawn from ``[0, vocab_size)``.
        inputs: keyword inputs instead of one tensor (name -> shape, dtype, vocab_size,
            fill; :func:`hawq.models.examples.keyword_spec`): the model is called
            ``model(**inputs)``, as on samples whose input is a dict.

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
    if inputs:
        spec = keyword_spec(inputs)
    else:
        keys = ("input_shape", "input_dtype")
        single = input_spec("model.prepare", input_shape, input_dtype, vocab_size, keys=keys)
        spec = ExampleSpec(((None, single),))
    example = spec.make(example_batch)
    was_training = model.training
    out, report = prepare(model.eval(), example, inplace=True)
    out.train(was_training)
    _check_share(report, min_share, type(model).__name__)
    out.hawq_capture = report
    setattr(out, EXAMPLE_ATTR, spec)  # the op probes feed inputs like these, not float zeros
    log.info("prepared %s: %s", type(model).__name__, report.summary().splitlines()[0])
    return out


def _check_share(report: CaptureReport, min_share: float, name: str) -> None:
    if report.share + 1e-12 < min_share:
        left = "; ".join(str(x) for x in report.left_out)
        raise HawqError(
            f"{name}: {report.share:.1%} of the product FLOPs captured, below "
            f"model.min_share={min_share}; left float: {left}"
        )
