"""Stage ``train``: FP training with per-epoch checkpoints and exact resume.

Outputs: ``paths.checkpoint`` (the FP model), ``metrics.csv`` (one row per
epoch). While running, ``train_state.pt`` holds model, optimizer and scheduler
state after the last finished epoch; a killed run restarts from it. Epoch ``e``
draws its data order, augmentation and dropout from ``seed`` and ``e`` alone,
so a resumed run ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch import nn
from tqdm import tqdm

from hawq import preempt
from hawq.checkpoint import restore_state, save_model
from hawq.config import TrainConfig
from hawq.engine import (
    amp_enabled,
    cosine_scheduler,
    evaluate,
    fmt_seconds,
    start_epoch_streams,
    stopped_partial,
    train_epoch,
    training_state,
)
from hawq.errors import HawqError
from hawq.io import load_torch, save_torch, write_csv
from hawq.stages.context import Context
from hawq.stages.contract import Contract

log = logging.getLogger("hawq")
STATE = "train_state.pt"
CSV = "metrics.csv"
CSV_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "seconds",
    "img_per_s",
]


def _write_csv(ctx: Context, history: list[dict]) -> None:
    write_csv(ctx.path(CSV), CSV_FIELDS, history)


LONG_RUN_S = 3600.0  # a train stage estimated beyond this on a CPU names the CPU recipe


def _announcer(ctx: Context, steps: int, epochs: int):
    """Callback for the first epoch's timed steps: log the train stage's estimated wall time
    (steps only; evaluation adds a few percent) and, on a CPU past an hour, the CPU recipe."""

    def announce(seconds_per_step: float) -> None:
        estimate = seconds_per_step * steps * epochs
        log.info(
            "train: %.3f s/step -> estimated %s for %d epochs on this machine",
            seconds_per_step,
            fmt_seconds(estimate),
            epochs,
        )
        if estimate > LONG_RUN_S and ctx.device.type == "cpu":
            log.warning(
                "train: ~%s on this CPU (no CUDA GPU); experiment=vit_cifar_cpu trains "
                "the seed topology, narrower, in under an hour on 2 cores",
                fmt_seconds(estimate),
            )

    return announce


@dataclass
class _Training:
    """What one training run works with (built by :func:`_setup`)."""

    ctx: Context
    tc: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    train_loader: object
    test_loader: object
    steps: int
    state_path: object


CONTRACT = Contract(("seed", "model", "data", "train"), keep=True)


def run(ctx: Context) -> dict:
    t = _setup(ctx)
    tc = t.tc
    start_epoch, history, partial = _resume(t)
    step_model = torch.compile(t.model) if tc.compile else t.model
    announce = _announcer(ctx, t.steps, tc.epochs - start_epoch)
    stage_start = time.perf_counter()
    bar = tqdm(
        range(start_epoch, tc.epochs),
        desc="epochs",
        initial=start_epoch,
        total=tc.epochs,
        disable=None,
    )
    with preempt.graceful():  # a stop signal ends the epoch after its current step
        for epoch in bar:
            start_epoch_streams(t.train_loader, ctx.run.seed, epoch, partial)
            tr = _train_epoch(
                t, step_model, epoch, history, partial, announce if epoch == start_epoch else None
            )
            partial = None
            history.append(_epoch_row(t, epoch, tr))
            _report(t, bar, history[-1], (time.perf_counter() - stage_start, start_epoch))
            _write_csv(ctx, history)
            state = training_state(epoch + 1, history, t.model, t.optimizer, t.scheduler)
            save_torch(t.state_path, state)
            # a signal during the evaluation or the save: stop here
            preempt.stop_if_requested("train", epoch + 1, t.state_path)
    return _finish(t, history)


def _setup(ctx: Context) -> _Training:
    tc = ctx.group("train")
    model = ctx.build_model()
    optimizer = instantiate(tc.optimizer)([p for p in model.parameters() if p.requires_grad])
    train_loader = ctx.data.train_loader(ctx.device, seed=ctx.run.seed)
    steps = len(train_loader)
    scheduler = cosine_scheduler(
        optimizer, tc.epochs * steps, round(tc.warmup_epochs * steps), tc.min_lr_ratio
    )
    loss_fn = ctx.loss_fn(tc.label_smoothing)
    test_loader = ctx.data.eval_loader("test", ctx.device)
    return _Training(
        ctx,
        tc,
        model,
        optimizer,
        scheduler,
        loss_fn,
        train_loader,
        test_loader,
        steps,
        ctx.path(STATE),
    )


def _resume(t: _Training) -> tuple[int, list[dict], dict | None]:
    """``(epochs done, history, partial epoch)`` from the state file (fresh: 0, [], None)."""
    tc, path = t.tc, t.state_path
    start_epoch, history, partial = 0, [], None
    if path.is_file() and t.ctx.force:
        path.unlink()
    if path.is_file():
        state = load_torch(path)
        restore_state(path, state, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler)
        start_epoch, history = state["epoch"], state.get("history", [])
        partial = state.get("partial")  # stopped inside epoch start_epoch + 1
        where = f", step {partial['progress']['step']} of the next" if partial else ""
        log.info("train: resuming after epoch %d%s from %s", start_epoch, where, path)
    if start_epoch > tc.epochs:
        raise HawqError(f"{path} is at epoch {start_epoch} > train.epochs={tc.epochs}")
    precision = "bf16 autocast" if amp_enabled(t.ctx.device, tc.amp) else "fp32"
    log.info(
        "train: %d epochs x %d steps of batch %d on %s (%s)%s",
        tc.epochs,
        t.steps,
        t.ctx.data.batch_size,
        t.ctx.device,
        precision,
        f", resuming at epoch {start_epoch + 1}" if start_epoch else "",
    )
    return start_epoch, history, partial


def _train_epoch(
    t: _Training,
    step_model: nn.Module,
    epoch: int,
    history: list[dict],
    partial: dict | None,
    announce,
) -> dict:
    """One epoch (or its rest after a mid-epoch stop); a stop signal inside it writes the
    state at its step and exits."""
    tc = t.tc
    try:
        tr = train_epoch(
            step_model,
            t.train_loader,
            t.optimizer,
            t.loss_fn,
            t.ctx.device,
            t.scheduler,
            amp=tc.amp,
            grad_clip=tc.grad_clip,
            log_every=tc.log_every,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            on_estimate=announce,
            resume=partial and partial["progress"],
            steps_after=(tc.epochs - epoch - 1) * t.steps,
        )
    except FloatingPointError as e:
        raise HawqError(f"training diverged in epoch {epoch + 1}: {e}; lower the lr") from e
    if "stopped" in tr:  # a stop signal inside the epoch: state at its step
        stopped = stopped_partial(tr["stopped"], t.train_loader)
        state = training_state(epoch, history, t.model, t.optimizer, t.scheduler, partial=stopped)
        save_torch(t.state_path, state)
        preempt.stop_if_requested("train", epoch, t.state_path, tr["stopped"]["step"])
    return tr


def _epoch_row(t: _Training, epoch: int, tr: dict) -> dict:
    """The epoch's history row, with a test evaluation every ``eval_every`` and at the end
    (an fp32 pass over the test set costs ~1/3 of a bf16 epoch on a CPU)."""
    tc = t.tc
    ev = {"loss": None, "acc": None}
    if epoch + 1 == tc.epochs or (epoch + 1) % tc.eval_every == 0:
        ev = evaluate(t.model, t.test_loader, t.ctx.device)
    return {
        "epoch": epoch + 1,
        "train_loss": tr["loss"],
        "train_acc": tr["acc"],
        "test_loss": ev["loss"],
        "test_acc": ev["acc"],
        "lr": tr["lr"],
        "seconds": tr["seconds"],
        "img_per_s": tr["img_per_s"],
    }


def _report(t: _Training, bar, row: dict, timing: tuple[float, int]) -> None:
    elapsed, start_epoch = timing
    epoch, epochs = row["epoch"], t.tc.epochs
    test = (
        "not evaluated"
        if row["test_acc"] is None
        else f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}"
    )
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", test=test)
    eta = elapsed / (epoch - start_epoch) * (epochs - epoch)
    log.info(
        "epoch %d/%d: train loss %.4f acc %.2f | %s | %.0f img/s | elapsed %s, train stage ETA %s",
        epoch,
        epochs,
        row["train_loss"],
        row["train_acc"],
        test,
        row["img_per_s"],
        fmt_seconds(elapsed),
        fmt_seconds(eta),
    )


def _finish(t: _Training, history: list[dict]) -> dict:
    ctx, tc, last = t.ctx, t.tc, history[-1]
    save_model(
        ctx.checkpoint,
        t.model,
        ctx.cfg.model,
        epochs=tc.epochs,
        test_acc=last["test_acc"],
        data=ctx.cfg.data.name,
    )
    ctx.remove_after_record(t.state_path)
    return {
        "epochs": tc.epochs,
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "best_test_acc": max(r["test_acc"] for r in history if r["test_acc"] is not None),
        "train_seconds": sum(r["seconds"] for r in history),
        "img_per_s": sum(r["img_per_s"] for r in history) / len(history),
        "checkpoint": str(ctx.checkpoint),
    }
