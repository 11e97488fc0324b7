"""Quantization-aware training machinery (the ``qat`` stage calls it).

:func:`param_groups` (weights, biases and quantizer parameters, step sizes in log space),
:class:`~hawq.quant.scale_optim.QATAdam` state loading, the re-fit (and optional block
reconstruction) of quantizers whose width dropped in a progressive schedule, the
non-finite watch that names the ops whose scales collapsed, and :func:`qat_epoch`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.engine import (
    train_epoch,
)
from hawq.errors import HawqError
from hawq.io import load_torch
from hawq.quant import (
    Plan,
    collapsed_ops,
    quant_ops,
)
from hawq.quant.api import quantizers, refit_
from hawq.quant.config import QATConfig, QuantConfig
from hawq.quant.quantizer import Quantizer
from hawq.quant.reconstruct import calibration_images, reconstruct_
from hawq.quant.scale_optim import QATAdam

log = logging.getLogger("hawq")


def check_schedule(tc: QATConfig, plan: Plan, op_names: list[str]) -> None:
    """The schedule's last floor must reach every int op's plan bits."""
    if not tc.schedule:
        return
    lowest = [
        b
        for s in plan.resolved(op_names).values()
        for b, f in ((s.w_bits, s.w_format), (s.a_bits, s.a_format))
        if b is not None and f == "int"
    ]
    if lowest and tc.schedule[-1] > min(lowest):
        raise HawqError(
            f"qat.schedule={tc.schedule} ends at {tc.schedule[-1]} bits but the "
            f"plan has {min(lowest)}-bit operands; end it at <= {min(lowest)}"
        )
    needed = tc.epochs_per_step * (len(tc.schedule) - 1) + 1
    if needed > tc.epochs:
        raise HawqError(
            f"qat.schedule={tc.schedule} with epochs_per_step={tc.epochs_per_step} "
            f"needs qat.epochs >= {needed}"
        )


POSITIVE = ("scale", "alpha")  # quantizer parameters that must stay > 0 (log-space group)


def load_init(model: nn.Module, path: str, plan: Plan) -> None:
    """Weights and qparams from a quantized checkpoint of the same plan (``qat.init``), e.g.
    the ``ptq_model.pt`` of a run with ``quant.reconstruct.enabled``: PTQ step sizes become
    the LSQ parameters under the same state-dict keys."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HawqError(f"qat.init={path}: no such file")
    ckpt = load_torch(p)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "quantized":
        raise HawqError(f"qat.init={path} is not a hawq quantized checkpoint (ptq_model.pt)")
    if Plan.from_dict(ckpt["plan"], where=f"{p}:plan").to_dict() != plan.to_dict():
        raise HawqError(
            f"qat.init={path} was quantized with another plan than this run's; "
            "start from a checkpoint of the same plan"
        )
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise HawqError(
            f"qat.init={path} does not fit qat.method={model_method(model)}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    log.info(
        "qat: weights and qparams from %s (accuracy there %s)", p, ckpt.get("meta", {}).get("acc")
    )


def model_method(model: nn.Module) -> str | None:
    return next((q.learn for q in quantizers(model).values() if q.learn), None)


def param_groups(model: nn.Module, tc: QATConfig) -> list[dict]:
    """Weights at ``lr`` (with weight decay); step sizes and clips at ``qparam_lr`` in log
    space (``qparam_space=log``); LSQ+ offsets at ``qparam_lr`` (no weight decay)."""
    kinds = {
        id(p): name
        for m in model.modules()
        if isinstance(m, Quantizer)
        for name, p in m.named_parameters(recurse=False)
    }
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if id(p) not in kinds]
    pos = [p for p in params if kinds.get(id(p)) in POSITIVE]
    other = [p for p in params if id(p) in kinds and kinds[id(p)] not in POSITIVE]
    groups = [{"params": weights, "lr": tc.lr, "weight_decay": tc.weight_decay, "log_space": False}]
    if pos:
        groups.append(
            {
                "params": pos,
                "lr": tc.qparam_lr,
                "weight_decay": 0.0,
                "log_space": tc.qparam_space == "log",
            }
        )
    if other:
        groups.append(
            {"params": other, "lr": tc.qparam_lr, "weight_decay": 0.0, "log_space": False}
        )
    return groups


def load_optimizer(optimizer: QATAdam, saved: dict) -> None:
    """Load a saved optimizer state; a state from before log-space step sizes
    (``torch.optim.Adam``, no ``log_space`` key) keeps today's group flags and drops the
    moments of log-space parameters (they were in units of ``s``, not ``log s``)."""
    flags = [g["log_space"] for g in optimizer.param_groups]
    legacy = any("log_space" not in g for g in saved["param_groups"])
    optimizer.load_state_dict(saved)
    for g, flag in zip(optimizer.param_groups, flags, strict=True):
        g["log_space"] = flag
        if legacy and flag:
            optimizer.reset_state(g["params"])


def refit_after_drop(
    model: nn.Module, optimizer: QATAdam, changed: list[str], batches, max_batches: int
) -> list[str]:
    """:func:`~hawq.quant.api.refit_` the changed quantizers, reset their moments."""
    done = refit_(model, changed, batches, max_batches)
    qs = quantizers(model)
    optimizer.reset_state([p for n in done for p in qs[n].parameters(recurse=False)])
    return done


def reconstruct_after_drop(
    model: nn.Module, fp_model: nn.Module, optimizer: QATAdam, batches, qc: QuantConfig
) -> None:
    """Block reconstruction (:mod:`hawq.quant.reconstruct`) of the re-fitted model against the
    FP model on the calibration images; moments of every quantizer parameter reset."""
    images = calibration_images(batches, qc.calib_batches)
    reconstruct_(model, fp_model, images, qc.reconstruct, qc.calib_batch_size)
    optimizer.reset_state(
        [p for q in quantizers(model).values() for p in q.parameters(recurse=False)]
    )


class NonFiniteWatch:
    """Records, without a host sync, when (a running count of op calls) each quantized
    op's output first went NaN/Inf; after a divergence the earliest one is its origin."""

    def __init__(self, model: nn.Module) -> None:
        self.ops = quant_ops(model)
        dev = next(model.parameters()).device
        self.step = torch.zeros((), dtype=torch.long, device=dev)
        self.first = {n: torch.full((), 2**62, dtype=torch.long, device=dev) for n in self.ops}
        self.handles = []
        for name, op in self.ops.items():
            self.handles.append(op.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out) -> None:
            if module.training:
                self.step += 1
                # one read-only pass: a NaN/Inf anywhere makes the sum non-finite (a finite
                # output overflowing the fp32/bf16 range in the sum is divergence anyway)
                bad = ~torch.isfinite(out.detach().sum())
                self.first[name] = torch.where(
                    bad & (self.step < self.first[name]), self.step, self.first[name]
                )

        return hook

    def origin(self) -> list[str]:
        first = {n: int(t) for n, t in self.first.items()}
        lo = min(first.values(), default=2**62)
        return [n for n, s in first.items() if s == lo][:1] if lo < 2**62 else []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def qat_epoch(
    model: nn.Module,
    batches,
    optimizer,
    loss_fn,
    device,
    scheduler,
    tc: QATConfig,
    epoch: int,
    train_model: nn.Module | None = None,
    watch: NonFiniteWatch | None = None,
    **resume: Any,
) -> dict[str, Any]:
    """One training epoch; a NaN/Inf loss becomes a HawqError naming the collapsed ops.

    Named: the ops whose output went non-finite first (step-wise) and whose own scales
    are collapsed or non-finite at that point; else every op with such scales now.

    Args:
        model: the (unwrapped) quantized model.
        train_model: what runs the steps (DDP and/or ``torch.compile`` wrapper of
            ``model``); ``model`` itself when None.
        watch: a run-long :class:`NonFiniteWatch` (registering hooks once keeps a compiled
            graph valid); one for this epoch when None.
        resume: ``resume`` / ``steps_after`` of :func:`hawq.engine.train_epoch`.
    """
    own = watch is None
    watch = watch or NonFiniteWatch(model)
    train_model = model if train_model is None else train_model
    try:
        return train_epoch(
            train_model,
            batches,
            optimizer,
            loss_fn,
            device,
            scheduler,
            amp=tc.amp,
            grad_clip=tc.grad_clip,
            desc=f"qat {epoch + 1}",
            **resume,
        )
    except FloatingPointError as e:
        origin = watch.origin()
        bad = [n for n in origin if n in collapsed_ops(model)] or origin or collapsed_ops(model)
        names = ", ".join(bad) if bad else "none (weights and scales finite)"
        raise HawqError(
            f"QAT diverged in epoch {epoch + 1}: {e}; ops with collapsed or "
            f"non-finite scales: {names}; lower qat.lr/qat.qparam_lr"
        ) from e
    finally:
        if own:
            watch.remove()
