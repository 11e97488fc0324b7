"""Quantization errors ``||Q(W) - W||^2`` and ``E_x ||Q(a) - a||^2`` with the deployed quantizer.

The ILP objective (:mod:`hawq.alloc.sensitivity`) multiplies these errors by curvatures,
so they must come from the quantizer PTQ/QAT will apply, not a stand-in: every error
here is measured with the :class:`~hawq.quant.quantizer.Quantizer` that
:func:`hawq.quant.quantize_` builds for the candidate's setting (``base`` with the
candidate's bits and formats), initialised the way :func:`hawq.quant.calibrate` does:

* weights: ``init_from_weight`` (min/max per channel/group, or MSE-optimal clipping
  when ``base.calibrator == "mse"``) on the weight that is deployed: a conv followed by
  a BatchNorm quantizes ``W_f = W gamma / sigma``; the error is mapped back to the
  Hessian's parameters, ``dW = (Q(W_f) - W_f) sigma / gamma``;
* activations: ``base.calibrator`` observes the operand (unsigned grid when it is
  non-negative and the grid symmetric), then the operand is quantized; dynamic
  settings quantize each batch with its own range; MX blocks run along the operand's
  reduction dim.

All ops and candidates share **one** forward pass over ``n`` images with hooks; when
the per-sample errors' relative standard error
``sd(e_s) / (sqrt(n) * mean(e_s))`` of any (op, operand, level) exceeds ``rel_se``,
``n`` doubles (up to ``max_images``) and the pass is repeated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from hawq.alloc.candidates import Candidate
from hawq.alloc.report import OPERANDS
from hawq.errors import HawqError
from hawq.models.ops import call_with, example_batch_size
from hawq.quant.plan import OpSetting

WLevel = tuple[int | None, str]  # (w_bits, w_format)
ALevel = tuple[int | None, str]  # (a_bits, a_format)
#: (kind, operand) -> the dim the op reduces over: MX blocks run along it
BLOCK_AXIS = {
    ("linear", "w"): -1,
    ("conv2d", "w"): 1,
    ("linear", "x"): -1,
    ("conv2d", "x"): 1,
    ("matmul", "a"): -1,
    ("matmul", "b"): -2,
}


@torch.no_grad()
def weight_errors(
    module: nn.Module | None,
    kind: str,
    cands: Iterable[Candidate],
    base: OpSetting,
    bn: nn.BatchNorm2d | None = None,
    name: str = "?",
) -> dict[WLevel, float]:
    """``||dW||^2`` per distinct (w_bits, w_format) of ``cands`` (FP or no weight: 0)."""
    from hawq.quant.bn_fold import fold_factor, fold_weight_bias
    from hawq.quant.modules import weight_quantizer

    out: dict[WLevel, float] = {}
    for c in cands:
        level = (c.w_bits, c.w_format)
        if level in out:
            continue
        if c.w_bits is None or module is None or kind == "matmul":
            out[level] = 0.0
            continue
        w = module.weight.detach().float()
        inv = None
        if bn is not None:
            w, _ = fold_weight_bias(
                w,
                None,
                bn.running_mean,
                bn.running_var,
                bn.weight.detach(),
                bn.bias.detach(),
                bn.eps,
            )
            inv = fold_factor(bn.weight.detach(), bn.running_var, bn.eps).reshape(
                -1, *([1] * (w.dim() - 1))
            )
        setting = replace(base, w_bits=c.w_bits, w_format=c.w_format)
        q = weight_quantizer(setting, w, None, BLOCK_AXIS[(kind, "w")])
        q.init_from_weight(w)
        err = q(w).sub_(w)
        if inv is not None:
            err = err / torch.where(inv == 0, torch.ones_like(inv), inv)
        out[level] = float(torch.linalg.vector_norm(err).double() ** 2)
        if not math.isfinite(out[level]):
            raise _nonfinite(w, f"op {name} operand weight")
    return out


def _act_quantizer(base: OpSetting, level: ALevel, kind: str, operand: str):
    from hawq.quant.modules import act_quantizer

    bits, fmt = level
    return act_quantizer(
        replace(base, a_bits=bits, a_format=fmt), None, BLOCK_AXIS[(kind, operand)]
    )


def _per_sample_error(
    a: torch.Tensor, base: OpSetting, level: ALevel, kind: str, operand: str
) -> torch.Tensor:
    """``||Q(a_s) - a_s||^2`` per sample ``s`` (dim 0), with the deployed quantizer."""
    q = _act_quantizer(base, level, kind, operand)
    if not q.dynamic and (not bool(q.ready) or q.fmt.startswith("fp8")):
        q.start_observe()
        q(a)
        q.finish_observe()
    d = q(a).sub_(a)
    if d.dim() < 2:  # an operand without a sample dim (``x @ self.query``): one value
        d = d.reshape(1, -1)
    return torch.linalg.vector_norm(d.flatten(1), dim=1).double().pow(2)


def _nonfinite(a: torch.Tensor, where: str) -> HawqError:
    return HawqError(
        f"{where} has {int(torch.isnan(a).sum())} NaN and {int(torch.isinf(a).sum())} Inf value(s)"
    )


def _images(it: Iterator, n: int, have: list[Any]) -> Any:
    """The inputs of the first ``n`` samples (drawing more batches from ``it`` into
    ``have`` as needed): images of ``(x, y)`` pairs or tensors, or a dict of keyword
    inputs (token ids, masks) concatenated entry by entry."""
    while sum(example_batch_size(x) for x in have) < n:
        batch = next(it, None)
        if batch is None:
            break
        have.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    if not have:
        return None
    if isinstance(have[0], Mapping):
        return {k: torch.cat([h[k] for h in have])[:n] for k in have[0]}
    return torch.cat(have)[:n]


@torch.no_grad()
def activation_errors(
    model: nn.Module,
    batches: Iterable,
    op_cands: Mapping[str, tuple[str, list[Candidate]]],
    base: OpSetting,
    images: int = 32,
    max_images: int = 512,
    rel_se: float = 0.05,
) -> tuple[dict[str, dict[str, dict[ALevel, float]]], dict[str, float]]:
    """``E_x ||Q_a(a) - a||^2`` per op, operand and activation level (mean over samples).

    Args:
        model: the FP model (eval mode is set here).
        batches: yields ``(x, y)`` (or inputs).
        op_cands: op name -> (kind, candidates).
        base: the non-bit fields of the deployed setting.
        images: images of the first pass.
        max_images: most images used.
        rel_se: target relative standard error of every mean.

    Returns:
        The errors and ``{"images": n, "rel_se": worst relative standard error}``.
    """
    levels = {
        n: sorted({c.a_level for c in cs if c.a_bits is not None}, key=str)
        for n, (_, cs) in op_cands.items()
    }
    pool: list[torch.Tensor] = []
    it = iter(batches)
    n = max(1, min(images, max_images))
    was_training = model.training
    model.eval()
    try:
        while True:  # double the images until every mean is precise enough
            x = _images(it, n, pool)
            if x is None:
                raise HawqError("no calibration batches for the activation errors")
            per = _operand_errors(model, x, op_cands, levels, base)
            worst = _worst_rel_se(per.values())
            got = example_batch_size(x)
            if worst <= rel_se or got >= max_images or got < n:
                break
            n = min(2 * n, max_images)
    finally:
        model.train(was_training)
    out = {
        name: {
            k: {lv: float(per[(name, k, lv)].mean()) for lv in levels[name]} for k in OPERANDS[kind]
        }
        for name, (kind, _) in op_cands.items()
    }
    return out, {"images": example_batch_size(x), "rel_se": worst}


def _operand_errors(model, x, op_cands, levels, base) -> dict[tuple, torch.Tensor]:
    """``(op, operand, level) -> per-sample error`` from one forward pass on ``x``."""
    modules = dict(model.named_modules())
    per: dict[tuple[str, str, ALevel], torch.Tensor] = {}

    def hook_for(name: str, kind: str):
        def hook(_m, inputs, _out):
            for k, a in zip(OPERANDS[kind], inputs[: len(OPERANDS[kind])], strict=True):
                a = a.detach().float()
                where = f"alloc calibration: op {name} operand {k}"
                for lv in levels[name]:
                    try:  # a static calibrator refuses NaN/Inf; dynamic ones ...
                        e = _per_sample_error(a, base, lv, kind, k)
                    except HawqError as err:
                        raise _nonfinite(a, where) from err
                    if not bool(torch.isfinite(e).all()):  # ... show in the error
                        raise _nonfinite(a, where)
                    per[(name, k, lv)] = e

        return hook

    handles = [
        modules[name].register_forward_hook(hook_for(name, kind))
        for name, (kind, _) in op_cands.items()
        if levels[name]
    ]
    try:
        call_with(model, x)
    finally:
        for h in handles:
            h.remove()
    return per


def _worst_rel_se(errors) -> float:
    """The largest relative standard error of a mean among ``errors``."""
    worst = 0.0
    for e in errors:
        m = float(e.mean())
        if m > 0 and e.numel() > 1:
            worst = max(worst, float(e.std()) / math.sqrt(e.numel()) / m)
    return worst
