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
import csv
import io
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from hawq import distributed as dist
from hawq import preempt
from hawq.checkpoint import restore_state
from hawq.config import typed
from hawq.engine import (
    cosine_scheduler,
    evaluate,
    start_epoch_streams,
    stopped_partial,
    train_epoch,
    training_state,
)
from hawq.errors import HawqError
from hawq.io import load_torch, save_torch, write_text
from hawq.quant import (
    Plan,
    calibrate,
    check_ready,
    collapsed_ops,
    freeze_bn_,
    quant_ops,
    quantize_,
    save_plan,
    save_quantized,
    set_bits_,
)
from hawq.quant.api import quantizers, refit_
from hawq.quant.config import QATConfig, QuantConfig, resolve_plan
from hawq.quant.distill import DistillLoss
from hawq.quant.equalize import equalize_
from hawq.quant.quantizer import Quantizer
from hawq.quant.reconstruct import calibration_images, reconstruct_
from hawq.quant.scale_optim import QATAdam
from hawq.stages.context import Context
from hawq.stages.ptq import bits_histogram, load_fp, op_lines

log = logging.getLogger("hawq")
CKPT = "qat_model.pt"
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


def _write_csv(ctx: Context, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(history)
    write_text(ctx.path(CSV), buf.getvalue())


def run(ctx: Context) -> dict[str, Any]:
    created, device = dist.init_from_env(ctx.device)
    try:
        return _run(ctx, device)
    finally:
        if created:
            dist.tdist.destroy_process_group()


def _run(ctx: Context, device: torch.device) -> dict[str, Any]:
    qc = typed(ctx.cfg.quant, QuantConfig, "quant")
    tc = typed(ctx.cfg.qat, QATConfig, "qat")
    rank, world = dist.world()
    main = rank == 0
    plan, source = resolve_plan(qc, ctx.run_dir)
    model, model_cfg = load_fp(ctx)
    model.to(device)
    teacher = copy.deepcopy(model) if tc.distill > 0 else None  # the FP model, frozen
    fp_ref = teacher or (copy.deepcopy(model) if tc.reconstruct_on_drop else None)
    data = ctx.data
    test = data.eval_loader("test", device)

    def evaluate_all(m: nn.Module) -> dict[str, float]:
        shard = dist.shard_by_index(test, rank, world) if world > 1 else test
        return dist.reduce_eval_metrics(evaluate(m, shard, device), device)

    fp = evaluate_all(model)
    from hawq.models.ops import quantizable_ops

    check_schedule(tc, plan, list(quantizable_ops(model)))
    calib_loader = data.eval_loader("train", device, qc.calib_batch_size)
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
    init = evaluate_all(model)

    optimizer = QATAdam(param_groups(model, tc))
    train = data.train_loader(device, seed=ctx.run.seed)
    if world > 1:
        train = dist.ShardedBatches(train, rank, world)
    steps = len(train)
    scheduler = cosine_scheduler(
        optimizer, tc.epochs * steps, round(tc.warmup_epochs * steps), tc.min_lr_ratio
    )
    loss_fn: nn.Module = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    if teacher is not None:
        loss_fn = DistillLoss(
            model, teacher, tc.distill, tc.distill_temperature, tc.label_smoothing
        )

    state_path = ctx.path(STATE)
    start, history, drops, partial = 0, [], [], None
    resume = state_path.is_file() and not ctx.force
    dist.barrier()  # every rank decided before rank 0 removes a stale state
    if state_path.is_file() and ctx.force and main:
        state_path.unlink()
    if resume:
        state = load_torch(state_path)  # model state includes bit widths and BN-frozen flags
        opt_loader = SimpleNamespace(load_state_dict=lambda sd: load_optimizer(optimizer, sd))
        restore_state(state_path, state, model=model, optimizer=opt_loader, scheduler=scheduler)
        start, history, init = state["epoch"], state["history"], state["init"]
        drops, partial = state.get("drops", []), state.get("partial")
        where = f", step {partial['progress']['step']} of the next" if partial else ""
        log.info("qat: resuming after epoch %d%s from %s", start, where, state_path)
    if start > tc.epochs:
        raise HawqError(f"{state_path} is at epoch {start} > qat.epochs={tc.epochs}")

    train_model = dist.wrap_ddp(model, device)
    if tc.compile:
        train_model = torch.compile(train_model)
    watch = NonFiniteWatch(model)
    # one process: a stop signal ends the epoch after its step (ranks of a job would stop at
    # different steps, so under torchrun it stops at once and resumes from the last epoch)
    stops = preempt.graceful() if world == 1 else contextlib.nullcontext()
    try:
        with stops:
            for epoch in range(start, tc.epochs):
                floor = tc.floor_bits(epoch)
                changed = set_bits_(model, plan, floor)
                if changed and tc.refit_on_drop:
                    calib = data.eval_loader("train", device, qc.calib_batch_size)
                    refit_after_drop(model, optimizer, changed, calib, qc.calib_batches)
                    if tc.reconstruct_on_drop:
                        reconstruct_after_drop(model, fp_ref, optimizer, calib, qc)
                    dist.broadcast_state(model)
                    ev = evaluate_all(model)
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
                start_epoch_streams(train, ctx.run.seed, epoch, partial)
                tr = qat_epoch(
                    model,
                    train,
                    optimizer,
                    loss_fn,
                    device,
                    scheduler,
                    tc,
                    epoch,
                    train_model,
                    watch,
                    resume=partial and partial["progress"],
                    steps_after=(tc.epochs - epoch - 1) * steps,
                )
                partial = None
                if "stopped" in tr:  # one process (graceful only then): state at its step
                    save_torch(
                        state_path,
                        training_state(
                            epoch,
                            history,
                            model,
                            optimizer,
                            scheduler,
                            init=init,
                            drops=drops,
                            partial=stopped_partial(tr["stopped"], train),
                        ),
                    )
                    preempt.stop_if_requested("qat", epoch, state_path, tr["stopped"]["step"])
                if world > 1:
                    tr = dist.reduce_train_metrics(tr, train.seen, device)
                ev = evaluate_all(model)
                history.append(
                    {
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
                )
                log.info(
                    "qat epoch %d/%d (floor %s bits): train loss %.4f | test loss %.4f acc %.2f",
                    epoch + 1,
                    tc.epochs,
                    floor,
                    tr["loss"],
                    ev["loss"],
                    ev["acc"],
                )
                if main:
                    _write_csv(ctx, history)
                    save_torch(
                        state_path,
                        training_state(
                            epoch + 1, history, model, optimizer, scheduler, init=init, drops=drops
                        ),
                    )
                # a signal during the evaluation or the save: stop here
                preempt.stop_if_requested("qat", epoch + 1, state_path)
    finally:
        watch.remove()
        if isinstance(loss_fn, DistillLoss):
            loss_fn.remove()

    last = history[-1]
    if main:
        save_plan(ctx.path(PLAN), plan, {"source": source, "method": tc.method})
        save_quantized(
            ctx.path(CKPT),
            model,
            model_cfg or ctx.cfg.model,
            plan,
            tc.method,
            qc.fold_bn,
            fp_acc=fp["acc"],
            acc=last["test_acc"],
            plan_source=source,
        )
        ctx.remove_after_record(state_path)
    dist.barrier()  # the checkpoint exists before any rank reports done
    return {
        "fp": fp,
        "init": init,  # quantized (calibrated) before QAT
        "quantized": {"acc": last["test_acc"], "loss": last["test_loss"], "n": fp["n"]},
        "acc_drop": fp["acc"] - last["test_acc"],
        "method": tc.method,
        "epochs": tc.epochs,
        "distill": tc.distill,
        "schedule": tc.schedule,
        "drops": drops,  # accuracy right after each bit drop (re-fitted), before training
        "collapsed_ops": collapsed_ops(model),
        "plan_source": source,
        "train_seconds": sum(r["seconds"] for r in history),
        "bits": bits_histogram(model),
        "ops": op_lines(model),
        "checkpoint": str(ctx.path(CKPT)),
        "world_size": world,
    }
