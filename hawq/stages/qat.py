"""Stage ``qat``: quantization-aware training (LSQ, LSQ+, PACT or STE) from the FP model.

Inputs: ``paths.checkpoint`` and the plan (as for ``ptq``). The quantized model
is calibrated (initial qparams), then weights and qparams train together.
Optional progressive lowering: ``qat.schedule`` (e.g. [8, 4, 3, 2]) gives a bit
floor per ``qat.epochs_per_step`` epochs; each op runs at ``max(plan bits, floor)``.
At every drop the quantizers whose width changed are re-fitted as a fresh PTQ at the
new width would be (``qat.refit_on_drop``: weight ranges from the current weights,
activation ranges observed on the calibration batches), their optimizer moments reset,
and the model is evaluated (``drops`` in the results): training after a drop starts at
fresh-PTQ accuracy for that width instead of the old width's range on a coarser grid.
``qat.reconstruct_on_drop`` adds block reconstruction after the re-fit (``quant.reconstruct``
settings; AdaRound rounding and LSQ step sizes fitted unit by unit to the FP model).
Folded BN statistics freeze at ``qat.freeze_bn_epoch``. ``qat.init`` starts from a
quantized checkpoint of the same plan instead of the fresh calibration (e.g. the
``ptq_model.pt`` of a run with ``quant.reconstruct.enabled``).

Optimizer: :class:`~hawq.quant.scale_optim.QATAdam`; step sizes and PACT clips update in
log space (``qat.qparam_space=log``), so they scale with themselves and never flip
sign; the final ``collapsed_ops`` are reported.

Outputs: ``qat_model.pt`` (quantized checkpoint), ``qat_bits.yaml``,
``qat_metrics.csv``; ``qat_state.pt`` holds the state after the last finished
epoch and a restarted run resumes from it exactly (per-epoch seeds, as ``train``).
A NaN/Inf loss stops the run naming the ops whose scales collapsed.

Data parallel: under ``torchrun --nproc_per_node N -m hawq.run ... stages=[qat]`` the
stage joins the process group (gloo on CPU, NCCL on CUDA), calibrates on every rank and
broadcasts rank 0's qparams, gives each rank a contiguous 1/N slice of every global
batch (``data.batch_size`` stays the global batch, so the run equals the 1-process one
up to floating-point summation order and resumes exactly), trains the DDP-wrapped
model, all-reduces the metrics, and only rank 0 writes files (see
:mod:`hawq.distributed`). ``qat.compile=true`` runs the training steps through
``torch.compile`` (evaluation, calibration and saving use the eager model; no Hessian is
ever taken of the compiled one).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from hawq import distributed as dist
from hawq import preempt
from hawq.checkpoint import restore_state
from hawq.engine import (
    cosine_scheduler,
    evaluate,
    start_epoch_streams,
    stopped_partial,
    training_state,
)
from hawq.errors import HawqError
from hawq.io import load_torch, save_torch, write_csv
from hawq.models.ops import quantizable_ops
from hawq.quant import (
    Plan,
    calibrate,
    check_ready,
    collapsed_ops,
    freeze_bn_,
    quantize_,
    save_plan,
    save_quantized,
    set_bits_,
)
from hawq.quant.api import bits_histogram, op_lines
from hawq.quant.config import QATConfig, QuantConfig, resolve_plan
from hawq.quant.distill import DistillLoss
from hawq.quant.equalize import equalize_
from hawq.quant.qat import (
    NonFiniteWatch,
    check_schedule,
    load_init,
    load_optimizer,
    param_groups,
    qat_epoch,
    reconstruct_after_drop,
    refit_after_drop,
)
from hawq.quant.scale_optim import QATAdam
from hawq.stages.context import Context
from hawq.stages.contract import QAT_MODEL, Contract, checkpoint, plan_file

log = logging.getLogger("hawq")
CKPT = QAT_MODEL
PLAN = "qat_bits.yaml"
STATE = "qat_state.pt"
CSV = "qat_metrics.csv"
FIELDS = [
    "epoch",
    "floor_bits",
    "bn_frozen",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "seconds",
    "img_per_s",
]


def _write_csv(ctx: Context, history: list[dict]) -> None:
    write_csv(ctx.path(CSV), FIELDS, history)


CONTRACT = Contract(("seed", "data", "quant", "qat"), (checkpoint, plan_file), keep=True)


def run(ctx: Context) -> dict[str, Any]:
    created, device = dist.init_from_env(ctx.device)
    try:
        return _run(ctx, device)
    finally:
        if created:
            dist.tdist.destroy_process_group()


def _save_state(q: _QAT, epoch: int, history: list[dict], drops, partial=None) -> None:
    """The resumable QAT state after ``epoch`` epochs (``partial``: a stopped epoch's)."""
    extra = {"partial": partial} if partial is not None else {}
    state = training_state(
        epoch, history, q.model, q.optimizer, q.scheduler, init=q.init, drops=drops, **extra
    )
    save_torch(q.state_path, state)


@dataclass
class _QAT:
    """What one QAT run works with (built by :func:`_prepare` and :func:`_optimizers`)."""

    ctx: Context
    qc: QuantConfig
    tc: QATConfig
    device: torch.device
    plan: Plan
    source: str
    model: nn.Module
    model_cfg: dict | None
    fp_ref: nn.Module | None  # the FP model, for distillation / reconstruction on drops
    evaluate: Any  # model -> test metrics (sharded and all-reduced under torchrun)
    fp: dict
    init: dict
    optimizer: Any = None
    scheduler: Any = None
    loss_fn: Any = None
    train: Any = None
    steps: int = 0
    state_path: Path | None = None


def _run(ctx: Context, device: torch.device) -> dict[str, Any]:
    q = _prepare(ctx, device)
    _optimizers(q)
    start, history, drops, partial = _resume(q)
    rank, world = dist.world()
    train_model = dist.wrap_ddp(q.model, device)
    if q.tc.compile:
        train_model = torch.compile(train_model)
    watch = NonFiniteWatch(q.model)
    # one process: a stop signal ends the epoch after its step (ranks of a job would stop at
    # different steps, so under torchrun it stops at once and resumes from the last epoch)
    stops = preempt.graceful() if world == 1 else contextlib.nullcontext()
    try:
        with stops:
            for epoch in range(start, q.tc.epochs):
                floor, frozen = _bits_and_bn(q, epoch, drops)
                start_epoch_streams(q.train, ctx.run.seed, epoch, partial)
                tr = _train_epoch(q, epoch, history, drops, partial, train_model, watch)
                partial = None
                history.append(_epoch_row(q, epoch, floor, frozen, tr))
                if rank == 0:
                    _write_csv(ctx, history)
                    _save_state(q, epoch + 1, history, drops)
                # a signal during the evaluation or the save: stop here
                preempt.stop_if_requested("qat", epoch + 1, q.state_path)
    finally:
        watch.remove()
        if isinstance(q.loss_fn, DistillLoss):
            q.loss_fn.remove()
    return _finish(q, history, drops)


def _prepare(ctx: Context, device: torch.device) -> _QAT:
    """The FP model quantized with the plan, calibrated (or loaded from ``qat.init``)."""
    qc = ctx.group("quant")
    tc = ctx.group("qat")
    rank, world = dist.world()
    plan, source = resolve_plan(qc, ctx.run_dir)
    model, model_cfg = ctx.load_fp_model(), ctx.fp_model_config()
    model.to(device)
    teacher = copy.deepcopy(model) if tc.distill > 0 else None  # the FP model, frozen
    fp_ref = teacher or (copy.deepcopy(model) if tc.reconstruct_on_drop else None)
    test = ctx.data.eval_loader("test", device)

    def evaluate_all(m: nn.Module) -> dict[str, float]:
        shard = dist.shard_by_index(test, rank, world) if world > 1 else test
        return dist.reduce_eval_metrics(evaluate(m, shard, device), device)

    fp = evaluate_all(model)
    check_schedule(tc, plan, list(quantizable_ops(model)))
    calib_loader = ctx.data.eval_loader("train", device, qc.calib_batch_size)
    if equalize_(model, calib_loader, qc.equalize, qc.calib_batches):
        fp = evaluate_all(model)  # the equalized FP model (same up to float rounding)
    quantize_(model, plan, tc.method, qc.fold_bn)
    set_bits_(model, plan, tc.floor_bits(0))
    torch.manual_seed(ctx.run.seed)
    calibrate(model, calib_loader, qc.calib_batches)
    if tc.init:
        load_init(model, tc.init, plan)
    dist.broadcast_state(model)  # identical qparams (and signedness) on every rank
    check_ready(model)
    return _QAT(
        ctx,
        qc,
        tc,
        device,
        plan,
        source,
        model,
        model_cfg,
        fp_ref,
        evaluate_all,
        fp,
        evaluate_all(model),
    )


def _optimizers(q: _QAT) -> None:
    """Optimizer, schedule, loss (with distillation) and the training batches."""
    tc, (rank, world) = q.tc, dist.world()
    q.optimizer = QATAdam(param_groups(q.model, tc))
    q.train = q.ctx.data.train_loader(q.device, seed=q.ctx.run.seed)
    if world > 1:
        q.train = dist.ShardedBatches(q.train, rank, world)
    q.steps = len(q.train)
    q.scheduler = cosine_scheduler(
        q.optimizer, tc.epochs * q.steps, round(tc.warmup_epochs * q.steps), tc.min_lr_ratio
    )
    q.loss_fn = q.ctx.loss_fn(tc.label_smoothing)
    if tc.distill > 0:
        q.loss_fn = DistillLoss(
            q.model, q.fp_ref, tc.distill, tc.distill_temperature, label_loss=q.loss_fn
        )
    q.state_path = q.ctx.path(STATE)


def _resume(q: _QAT) -> tuple[int, list, list, dict | None]:
    """``(epochs done, history, drops, partial epoch)`` from the state file."""
    path, ctx = q.state_path, q.ctx
    start, history, drops, partial = 0, [], [], None
    resume = path.is_file() and not ctx.force
    dist.barrier()  # every rank decided before rank 0 removes a stale state
    if path.is_file() and ctx.force and dist.world()[0] == 0:
        path.unlink()
    if resume:
        state = load_torch(path)  # model state includes bit widths and BN-frozen flags
        opt = SimpleNamespace(load_state_dict=lambda sd: load_optimizer(q.optimizer, sd))
        restore_state(path, state, model=q.model, optimizer=opt, scheduler=q.scheduler)
        start, history, q.init = state["epoch"], state["history"], state["init"]
        drops, partial = state.get("drops", []), state.get("partial")
        where = f", step {partial['progress']['step']} of the next" if partial else ""
        log.info("qat: resuming after epoch %d%s from %s", start, where, path)
    if start > q.tc.epochs:
        raise HawqError(f"{path} is at epoch {start} > qat.epochs={q.tc.epochs}")
    return start, history, drops, partial


def _bits_and_bn(q: _QAT, epoch: int, drops: list) -> tuple[int | None, bool]:
    """The epoch's bit floor (re-fitting the quantizers that dropped) and BN freezing."""
    tc, qc, model = q.tc, q.qc, q.model
    floor = tc.floor_bits(epoch)
    changed = set_bits_(model, q.plan, floor)
    if changed and tc.refit_on_drop:
        calib = q.ctx.data.eval_loader("train", q.device, qc.calib_batch_size)
        refit_after_drop(model, q.optimizer, changed, calib, qc.calib_batches)
        if tc.reconstruct_on_drop:
            reconstruct_after_drop(model, q.fp_ref, q.optimizer, calib, qc)
        dist.broadcast_state(model)
        ev = q.evaluate(model)
        drops.append(
            {
                "epoch": epoch,
                "floor_bits": floor,
                "acc": ev["acc"],
                "loss": ev["loss"],
                "refitted": len(changed),
            }
        )
        log.info(
            "qat: floor %s bits: %d quantizers re-fitted, acc %.2f loss %.4f",
            floor,
            len(changed),
            ev["acc"],
            ev["loss"],
        )
    frozen = tc.freeze_bn_epoch is not None and epoch >= tc.freeze_bn_epoch
    if frozen:
        freeze_bn_(model)
    return floor, frozen


def _train_epoch(
    q: _QAT,
    epoch: int,
    history: list,
    drops: list,
    partial: dict | None,
    train_model: nn.Module,
    watch: NonFiniteWatch,
) -> dict:
    """One epoch (or its rest); a stop signal inside it writes the state at its step."""
    tc = q.tc
    tr = qat_epoch(
        q.model,
        q.train,
        q.optimizer,
        q.loss_fn,
        q.device,
        q.scheduler,
        tc,
        epoch,
        train_model,
        watch,
        resume=partial and partial["progress"],
        steps_after=(tc.epochs - epoch - 1) * q.steps,
    )
    if "stopped" in tr:  # one process (graceful only then): state at its step
        _save_state(q, epoch, history, drops, partial=stopped_partial(tr["stopped"], q.train))
        preempt.stop_if_requested("qat", epoch, q.state_path, tr["stopped"]["step"])
    if dist.world()[1] > 1:
        tr = dist.reduce_train_metrics(tr, q.train.seen, q.device)
    return tr


def _epoch_row(q: _QAT, epoch: int, floor, frozen: bool, tr: dict) -> dict:
    ev = q.evaluate(q.model)
    log.info(
        "qat epoch %d/%d (floor %s bits): train loss %.4f | test loss %.4f acc %.2f",
        epoch + 1,
        q.tc.epochs,
        floor,
        tr["loss"],
        ev["loss"],
        ev["acc"],
    )
    return {
        "epoch": epoch + 1,
        "floor_bits": floor,
        "bn_frozen": frozen,
        "train_loss": tr["loss"],
        "train_acc": tr["acc"],
        "test_loss": ev["loss"],
        "test_acc": ev["acc"],
        "lr": tr["lr"],
        "seconds": tr["seconds"],
        "img_per_s": tr["img_per_s"],
    }


def _finish(q: _QAT, history: list, drops: list) -> dict[str, Any]:
    ctx, tc, qc, last = q.ctx, q.tc, q.qc, history[-1]
    if dist.world()[0] == 0:
        save_plan(ctx.path(PLAN), q.plan, {"source": q.source, "method": tc.method})
        save_quantized(
            ctx.path(CKPT),
            q.model,
            q.model_cfg or ctx.cfg.model,
            q.plan,
            tc.method,
            qc.fold_bn,
            fp_acc=q.fp["acc"],
            acc=last["test_acc"],
            plan_source=q.source,
        )
        ctx.remove_after_record(q.state_path)
    dist.barrier()  # the checkpoint exists before any rank reports done
    return {
        "fp": q.fp,
        "init": q.init,  # quantized (calibrated) before QAT
        "quantized": {"acc": last["test_acc"], "loss": last["test_loss"], "n": q.fp["n"]},
        "acc_drop": q.fp["acc"] - last["test_acc"],
        "method": tc.method,
        "epochs": tc.epochs,
        "distill": tc.distill,
        "schedule": tc.schedule,
        "drops": drops,  # accuracy right after each bit drop (re-fitted), before training
        "collapsed_ops": collapsed_ops(q.model),
        "plan_source": q.source,
        "train_seconds": sum(r["seconds"] for r in history),
        "bits": bits_histogram(q.model),
        "ops": op_lines(q.model),
        "checkpoint": str(ctx.path(CKPT)),
        "world_size": dist.world()[1],
    }
