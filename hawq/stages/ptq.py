"""Stage ``ptq``: post-training quantization of the FP checkpoint with a plan.

Inputs: ``paths.checkpoint`` (FP model) and the plan (``quant.plan``, else the
run's ``bits.yaml``, else ``quant.default``). Outputs: ``ptq_model.pt`` (a
quantized checkpoint: model config + plan + state, see
:func:`hawq.quant.load_quantized`), ``ptq_bits.yaml`` (the plan used) and
metrics: FP vs quantized accuracy/loss and a one-line setting per op. With
``quant.reconstruct.enabled`` the calibrated model is refined unit by unit against the FP
model on the calibration images (:mod:`hawq.quant.reconstruct`; no labels) before it is
evaluated and saved; ``reconstruct`` in the metrics has the calibrated accuracy and the
per-unit errors, ``ptq_reconstruct.png`` shows them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from hawq.engine import evaluate
from hawq.io import load_torch, save_torch
from hawq.models.ops import example_batch_size
from hawq.quant import (
    calibrate,
    check_ready,
    quantize_,
    save_plan,
    save_quantized,
)
from hawq.quant.api import bits_histogram, op_lines  # noqa: F401 - results helpers
from hawq.quant.config import resolve_plan
from hawq.quant.equalize import equalize_
from hawq.quant.reconstruct import calibration_images, reconstruct_, units
from hawq.stages.context import Context
from hawq.stages.contract import PTQ_MODEL, Contract, checkpoint, plan_file
from hawq.viz.reconstruct import plot_reconstruction

log = logging.getLogger("hawq")
CKPT = PTQ_MODEL
RECON_PLOT = "ptq_reconstruct.png"
RECON_STATE = "ptq_reconstruct_state.pt"  # resumable reconstruction (deleted when done)
PLAN = "ptq_bits.yaml"


def load_fp(ctx: Context) -> tuple[nn.Module, dict]:
    """The FP model (eval mode, on the run's device) and the config that rebuilds it."""
    return ctx.load_fp_model(), ctx.fp_model_config()


def _reconstruct(ctx: Context, qc, model, fp_model, calib, test) -> dict[str, Any]:
    """Block reconstruction of the calibrated ``model``, resumable unit by unit: the state
    after each unit is saved (``ptq_reconstruct_state.pt``, keyed by the quant and data
    config and the FP checkpoint) and a rerun after a stop continues from it, to the same
    result; the state is deleted once the stage's record is written."""
    images = calibration_images(calib, qc.calib_batches)
    before = evaluate(model, test, ctx.device)
    log.info(
        "ptq: calibrated %.2f; reconstructing %d units on %d images",
        before["acc"],
        len(units(model)),
        example_batch_size(images),
    )
    path, key = ctx.path(RECON_STATE), _state_key(ctx)
    resume = None
    if path.is_file() and not ctx.force:
        state = load_torch(path)
        resume = state if isinstance(state, dict) and state.get("key") == key else None
        if resume is None:
            log.info("ptq: %s was made with other settings; reconstructing from the start", path)
    per_unit = reconstruct_(
        model,
        fp_model,
        images,
        qc.reconstruct,
        qc.calib_batch_size,
        resume=resume,
        on_unit=lambda state: save_torch(path, {**state, "key": key}),
    )
    ctx.remove_after_record(path)
    return {
        "calibrated": before,
        "units": per_unit,
        "images": example_batch_size(images),
        "seconds": sum(u.get("seconds", 0.0) for u in per_unit.values()),
    }


def _state_key(ctx: Context) -> dict[str, Any]:
    """What a saved reconstruction state must have been made with to be resumed."""
    ck = ctx.checkpoint.stat()
    return {
        "quant": OmegaConf.to_container(ctx.cfg.quant, resolve=True),
        "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
        "checkpoint": [str(ctx.checkpoint), ck.st_size, ck.st_mtime_ns],
        "seed": ctx.run.seed,
    }


CONTRACT = Contract(("seed", "data", "quant"), (checkpoint, plan_file))


def run(ctx: Context) -> dict[str, Any]:
    qc = ctx.group("quant")
    plan, source = resolve_plan(qc, ctx.run_dir)
    model, model_cfg = load_fp(ctx)
    test = ctx.data.eval_loader("test", ctx.device)
    fp = evaluate(model, test, ctx.device)
    calib = ctx.data.eval_loader("train", ctx.device, qc.calib_batch_size)
    spread = equalize_(model, calib, qc.equalize, qc.calib_batches)
    if spread:
        fp = evaluate(model, test, ctx.device)  # the equalized FP model (same up to rounding)
    rc = qc.reconstruct
    fp_model = copy.deepcopy(model) if rc.enabled else None
    quantize_(model, plan, None, qc.fold_bn)
    n = calibrate(model, calib, qc.calib_batches)
    check_ready(model)
    recon = _reconstruct(ctx, qc, model, fp_model, calib, test) if fp_model is not None else None
    q = evaluate(model, test, ctx.device)
    if recon is not None:
        plot_reconstruction(
            recon["units"],
            ctx.path(RECON_PLOT),
            f"block reconstruction: test acc {recon['calibrated']['acc']:.2f} -> "
            f"{q['acc']:.2f} (FP {fp['acc']:.2f})",
        )
    log.info("ptq: FP acc %.2f -> quantized %.2f (plan from %s)", fp["acc"], q["acc"], source)
    save_plan(ctx.path(PLAN), plan, {"source": source})
    save_quantized(
        ctx.path(CKPT),
        model,
        model_cfg or ctx.cfg.model,
        plan,
        None,
        qc.fold_bn,
        fp_acc=fp["acc"],
        acc=q["acc"],
        plan_source=source,
    )
    return {
        "fp": fp,
        "quantized": q,
        "acc_drop": fp["acc"] - q["acc"],
        "plan_source": source,
        "calib_batches": n,
        "equalize": {"alpha": qc.equalize, "factor_spread": spread},
        "reconstruct": recon,
        "bits": bits_histogram(model),
        "ops": op_lines(model),
        "checkpoint": str(ctx.path(CKPT)),
    }
