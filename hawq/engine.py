"""Training and evaluation loops shared by FP training and QAT."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from hawq import preempt
from hawq.batches import call_model as _call_model
from hawq.batches import run_inputs
from hawq.errors import HawqError
from hawq.models.ops import as_logits

log = logging.getLogger("hawq")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HawqError(f"device={name} but no CUDA GPU is available; use device=cpu or auto")
    return dev


def cosine_multiplier(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine schedule (with optional warm-up) as a ``LambdaLR``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_multiplier(s, total_steps, warmup_steps, min_ratio)
    )


@functools.cache
def cpu_bf16_supported() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo;
    oneDNN's ``mkldnn_bf16_supported`` elsewhere). Without it, CPU bf16 autocast is slower
    than fp32, so ``amp`` stays off there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def amp_enabled(device: torch.device, enabled: bool) -> bool:
    """Whether ``amp: true`` turns into bf16 autocast on ``device``: always on CUDA, on the CPU
    only where bf16 matmuls are native (a seed-ViT step: 4.5 s fp32 -> 2.2 s bf16 here)."""
    if not enabled:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA, and on CPUs with native bf16 (see :func:`amp_enabled`), when
    enabled; a no-op context otherwise. Curvature (Hessian) code never uses it."""
    if amp_enabled(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fmt_seconds(seconds: float) -> str:
    """``3725`` -> ``1h02m``; ``95`` -> ``1m35s``; ``7.2`` -> ``7.2s``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class StepTimer:
    """Wall-clock progress of a long loop, logged without a TTY.

    ``tick(step)`` after each step logs one line every ``every_s`` seconds (elapsed, rate,
    ETA of the loop); after ``probe_steps`` steps (the first is a warm-up and not counted)
    it calls ``on_estimate(seconds_per_step)`` once, so a caller can announce the whole run's
    estimated wall time before it gets far.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        every_s: float = 60.0,
        probe_steps: int = 5,
        on_estimate: Callable[[float], None] | None = None,
        first: int = 0,
        steps_after: int = 0,
    ) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.probe_steps, self.on_estimate = probe_steps, on_estimate
        self.first, self.steps_after = first, steps_after  # resumed at; steps of later loops
        self.start = time.perf_counter()
        self.last_log = self.start
        self.after_first: float | None = None

    def tick(self, step: int, extra: str = "") -> None:
        now = time.perf_counter()
        done = step + 1
        here = done - self.first  # steps of this process (a resumed loop starts at first)
        if here == 1:
            self.after_first = now
        elif self.on_estimate is not None and here == self.probe_steps + 1:
            self.on_estimate((now - self.after_first) / self.probe_steps)
            self.on_estimate = None
        if now - self.last_log >= self.every_s and done < self.total:
            self.last_log = now
            elapsed = now - self.start
            per_step = elapsed / max(done - self.first, 1)
            eta = per_step * (self.total - done)
            run_eta = ""
            if self.steps_after:
                run_eta = f", stage ETA {fmt_seconds(eta + per_step * self.steps_after)}"
            log.info(
                "%s: step %d/%d%s | elapsed %s, ETA %s%s",
                self.desc,
                done,
                self.total,
                extra,
                fmt_seconds(elapsed),
                fmt_seconds(eta),
                run_eta,
            )


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: bool = True,
    grad_clip: float | None = None,
    desc: str = "train",
    log_every: int = 20,
    progress_s: float = 60.0,
    on_estimate: Callable[[float], None] | None = None,
    resume: dict[str, Any] | None = None,
    steps_after: int = 0,
) -> dict[str, Any]:
    """One pass over ``batches``; returns mean loss, accuracy, last lr, images/s.

    Preemption (:mod:`hawq.preempt`): when a stop signal is pending after a step, the pass
    ends there and returns ``{"stopped": progress}`` instead, where ``progress`` (the next
    step, the running loss and accuracy sums, seconds so far) is what ``resume`` takes
    to finish the epoch later with the metrics of an uninterrupted pass (``batches`` must
    then start at that step: :meth:`hawq.data.loader.BatchLoader.set_epoch`).
    ``steps_after``: steps of the stage after this pass, for the stage's ETA in the
    progress lines.

    Every ``log_every`` steps the loss is read back (one host sync): the progress bar
    shows it and a NaN/Inf stops the epoch. Every ``progress_s`` seconds one log line
    (step, loss, elapsed, ETA of the epoch) is written whether or not stdout is a TTY;
    ``on_estimate(seconds_per_step)`` is called once after a few timed steps.

    Raises:
        FloatingPointError: the loss became NaN or Inf (callers add context).
    """
    model.train()
    r = resume or {}
    first = int(r.get("step", 0))
    total_loss = r["total_loss"].to(device) if r else torch.zeros((), device=device)
    correct = r["correct"].to(device) if r else torch.zeros((), device=device, dtype=torch.long)
    seen = int(r.get("seen", 0))
    start = time.perf_counter() - float(r.get("seconds", 0.0))
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = 0
    timer = StepTimer(
        total, desc, progress_s, on_estimate=on_estimate, first=first, steps_after=steps_after
    )
    lval = float("nan")
    bar = tqdm(batches, desc=desc, leave=False, disable=None)
    for step, (x, y) in enumerate(bar, start=first):
        out, loss = _step(model, x, y, optimizer, loss_fn, device, scheduler, amp, grad_clip)
        total_loss += loss.detach() * y.shape[0]
        correct += (out.argmax(-1) == y).sum()
        seen += y.shape[0]
        if step % log_every == 0:
            lval = loss.item()
            if not math.isfinite(lval):
                raise FloatingPointError(f"loss is {lval} at step {step}")
            bar.set_postfix(loss=f"{lval:.3f}")
        timer.tick(step, f", loss {lval:.3f}")
        preempt.step_done()
        if preempt.requested():
            bar.close()
            sums = {"total_loss": total_loss.detach().cpu(), "correct": correct.cpu()}
            done = {"step": step + 1, "seen": seen, "seconds": time.perf_counter() - start}
            return {"stopped": {**done, **sums}}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _epoch_metrics(total_loss, correct, seen, time.perf_counter() - start, optimizer)


def _step(model, x, y, optimizer, loss_fn, device, scheduler, amp: bool, grad_clip):
    """One optimizer step on ``(x, y)``; returns ``(output, loss)``."""
    with autocast(device, amp):
        out = as_logits(run_inputs(model, x))
        loss = loss_fn(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out, loss


def _epoch_metrics(total_loss, correct, seen: int, seconds: float, optimizer) -> dict[str, Any]:
    mean_loss = (total_loss / max(seen, 1)).item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"mean training loss is {mean_loss}")
    return {
        "loss": mean_loss,
        "acc": 100.0 * correct.item() / max(seen, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "img_per_s": seen / seconds if seconds > 0 else float("nan"),
    }


def start_epoch_streams(loader: Any, seed: int, epoch: int, partial: dict | None) -> None:
    """Data order, augmentation and dropout stream of ``epoch`` (from ``seed`` and ``epoch``
    alone), or where a stopped epoch left them (``partial`` of :func:`stopped_partial`)."""
    if partial is None:
        torch.manual_seed(seed * 100_003 + epoch)  # dropout stream of this epoch
        loader.set_epoch(epoch)
        return
    torch.set_rng_state(partial["rng"])
    loader.set_epoch(epoch, partial["progress"]["step"], partial["loader_rng"])


def training_state(
    epoch: int, history: list[dict], model: nn.Module, optimizer: Any, scheduler: Any, **extra: Any
) -> dict:
    """What a train/QAT state file holds after ``epoch`` finished epochs (``extra``: the
    stage's own keys, and ``partial`` of :func:`stopped_partial` when stopped inside the
    next one)."""
    return {
        "epoch": epoch,
        "history": history,
        **extra,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def stopped_partial(progress: dict, loader: Any) -> dict:
    """What resumes an epoch stopped after ``progress["step"]`` steps: the progress of
    :func:`train_epoch`, the dropout stream and the loader's augmentation stream."""
    return {
        "progress": progress,
        "rng": torch.get_rng_state(),
        "loader_rng": loader.generator.get_state(),
    }


@torch.no_grad()
def call_model(model: nn.Module, batch, device: torch.device | str | None = None):
    """:func:`hawq.batches.call_model` without autograd."""
    return _call_model(model, batch, device)


def forward_batches(
    model: nn.Module,
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Eval-mode, no-grad forward passes over up to ``max_batches`` batches, for observers
    and hooks; restores train mode. Returns batches run. A batch is an ``(x, y)`` pair
    (``model(x)``), an input tensor, or a dict of keyword inputs (``model(**batch)``:
    token ids, masks; non-tensor entries passed as they are)."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            call_model(model, batch, device)
            n += 1
    finally:
        model.train(was_training)
    return n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    amp: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over ``batches``, in eval mode."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in tqdm(batches, desc=desc, leave=False, disable=None):
        with autocast(device, amp):
            out = as_logits(run_inputs(model, x)).float()
        total_loss += loss_fn(out, y).double() * y.shape[0]
        correct += (out.argmax(-1) == y).sum()
        seen += y.shape[0]
    model.train(was_training)
    return {
        "acc": 100.0 * correct.item() / max(seen, 1),
        "loss": (total_loss / max(seen, 1)).item(),
        "n": seen,
    }
