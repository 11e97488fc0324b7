"""Stage ``train``: FP training with per-epoch checkpoints and exact resume.

Outputs: ``paths.checkpoint`` (the FP model), ``metrics.csv`` (one row per
epoch). While running, ``train_state.pt`` holds model, optimizer and scheduler
state after the last finished epoch; a killed run restarts from it. Epoch ``e``
draws its data order, augmentation and dropout from ``seed`` and ``e`` alone,
so a resumed run ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import time

import torch
from hydra.utils import instantiate
from torch import nn
from tqdm import tqdm

from hawq import preempt
from hawq.checkpoint import restore_state, save_model
from hawq.config import TrainConfig, typed
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
from hawq.io import load_torch, save_torch, write_text
from hawq.stages.context import Context

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
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    write_text(ctx.path(CSV), buf.getvalue())


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


def run(ctx: Context) -> dict:
    tc = typed(ctx.cfg.train, TrainConfig, "train")
    data = ctx.data
    model = ctx.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(tc.optimizer)(params)
    train_loader = data.train_loader(ctx.device, seed=ctx.run.seed)
    test_loader = data.eval_loader("test", ctx.device)
    steps = len(train_loader)
    scheduler = cosine_scheduler(
        optimizer, tc.epochs * steps, round(tc.warmup_epochs * steps), tc.min_lr_ratio
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    state_path = ctx.path(STATE)
    start_epoch, history, partial = 0, [], None
    if state_path.is_file() and ctx.force:
        state_path.unlink()
    if state_path.is_file():
        state = load_torch(state_path)
        restore_state(state_path, state, model=model, optimizer=optimizer, scheduler=scheduler)
        start_epoch, history = state["epoch"], state.get("history", [])
        partial = state.get("partial")  # stopped inside epoch start_epoch + 1
        where = f", step {partial['progress']['step']} of the next" if partial else ""
        log.info("train: resuming after epoch %d%s from %s", start_epoch, where, state_path)
    if start_epoch > tc.epochs:
        raise HawqError(f"{state_path} is at epoch {start_epoch} > train.epochs={tc.epochs}")

    step_model = torch.compile(model) if tc.compile else model
    precision = "bf16 autocast" if amp_enabled(ctx.device, tc.amp) else "fp32"
    log.info(
        "train: %d epochs x %d steps of batch %d on %s (%s)%s",
        tc.epochs,
        steps,
        data.batch_size,
        ctx.device,
        precision,
        f", resuming at epoch {start_epoch + 1}" if start_epoch else "",
    )
    announce = _announcer(ctx, steps, tc.epochs - start_epoch)
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
            start_epoch_streams(train_loader, ctx.run.seed, epoch, partial)
            try:
                tr = train_epoch(
                    step_model,
                    train_loader,
                    optimizer,
                    loss_fn,
                    ctx.device,
                    scheduler,
                    amp=tc.amp,
                    grad_clip=tc.grad_clip,
                    log_every=tc.log_every,
                    desc=f"epoch {epoch + 1}/{tc.epochs}",
                    on_estimate=announce if epoch == start_epoch else None,
                    resume=partial and partial["progress"],
                    steps_after=(tc.epochs - epoch - 1) * steps,
                )
                partial = None
                if "stopped" in tr:  # a stop signal inside the epoch: state at its step
                    save_torch(
                        state_path,
                        training_state(
                            epoch,
                            history,
                            model,
                            optimizer,
                            scheduler,
                            partial=stopped_partial(tr["stopped"], train_loader),
                        ),
                    )
                    preempt.stop_if_requested("train", epoch, state_path, tr["stopped"]["step"])
            except FloatingPointError as e:
                raise HawqError(f"training diverged in epoch {epoch + 1}: {e}; lower the lr") from e
            last_epoch = epoch + 1 == tc.epochs
            if last_epoch or (epoch + 1) % tc.eval_every == 0:
                ev = evaluate(model, test_loader, ctx.device)
            else:  # skipped: an fp32 pass over the test set costs ~1/3 of a bf16 epoch on a CPU
                ev = {"loss": None, "acc": None}
            row = {
                "epoch": epoch + 1,
                "train_loss": tr["loss"],
                "train_acc": tr["acc"],
                "test_loss": ev["loss"],
                "test_acc": ev["acc"],
                "lr": tr["lr"],
                "seconds": tr["seconds"],
                "img_per_s": tr["img_per_s"],
            }
            history.append(row)
            test = (
                "not evaluated"
                if ev["acc"] is None
                else f"test loss {ev['loss']:.4f} acc {ev['acc']:.2f}"
            )
            bar.set_postfix(loss=f"{tr['loss']:.3f}", test=test)
            elapsed = time.perf_counter() - stage_start
            eta = elapsed / (epoch + 1 - start_epoch) * (tc.epochs - epoch - 1)
            log.info(
                "epoch %d/%d: train loss %.4f acc %.2f | %s | %.0f img/s | elapsed %s, "
                "train stage ETA %s",
                epoch + 1,
                tc.epochs,
                tr["loss"],
                tr["acc"],
                test,
                tr["img_per_s"],
                fmt_seconds(elapsed),
                fmt_seconds(eta),
            )
            _write_csv(ctx, history)
            save_torch(state_path, training_state(epoch + 1, history, model, optimizer, scheduler))
            # a signal during the evaluation or the save: stop here
            preempt.stop_if_requested("train", epoch + 1, state_path)

    last = history[-1]
    save_model(
        ctx.checkpoint,
        model,
        ctx.cfg.model,
        epochs=tc.epochs,
        test_acc=last["test_acc"],
        data=ctx.cfg.data.name,
    )
    ctx.remove_after_record(state_path)
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
