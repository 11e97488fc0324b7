"""Data-parallel training helpers: process group from ``torchrun``, batch sharding, reductions.

Under ``torchrun --nproc_per_node N -m hawq.run ... stages=[qat]`` every rank builds
the *same* global batch ``B`` (same seed, same epoch, same augmentation draws) and
keeps the contiguous slice ``[r B/N, (r+1) B/N)``. DDP averages the rank gradients,

.. math::  \\frac{1}{N} \\sum_r \\nabla \\frac{N}{B} \\sum_{i \\in r} \\ell_i
           = \\nabla \\frac{1}{B} \\sum_{i=1}^{B} \\ell_i,

i.e. the gradient of the single-process step on the global batch (up to the order of
floating-point additions), so the run follows the 1-process trajectory and a resume
from any epoch is exact as before. Metrics are all-reduced as sums
(``sum loss_i``, ``correct``, ``n``). Evaluation batches are sharded by index
(``i % N == r``) and reduced the same way. Without a process group (or with
``WORLD_SIZE=1``) every function is the single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from hawq.errors import HawqError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the rank that writes artifacts."""
    return world()[0] == 0


def init_from_env(device: torch.device) -> tuple[bool, torch.device]:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise; rendezvous from the
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` environment.

    Returns:
        ``(created, device)``: whether this call created the group (the caller destroys
        it), and the rank's device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not tdist.is_available():
        return False, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if tdist.is_initialized():
        return False, device
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, device


def barrier() -> None:
    if world()[1] > 1:
        tdist.barrier()


class ShardedBatches:
    """This rank's contiguous slice of every global batch of a loader.

    Args:
        loader: yields ``(x, y)`` global batches; ``set_epoch``/``len`` pass through.
        rank, world_size: this process and the number of processes.

    Raises:
        HawqError: a global batch is not divisible by ``world_size`` (the slices must be
            equal for DDP's gradient average to be the global-batch mean).
    """

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.seen = 0

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.seen = 0
        for x, y in self.loader:
            b = y.shape[0]
            if b % self.world_size:
                raise HawqError(
                    f"a training batch of {b} samples does not split over "
                    f"{self.world_size} processes; make data.batch_size (and the "
                    f"last batch) divisible by the world size"
                )
            c = b // self.world_size
            lo = self.rank * c
            self.seen += c
            yield x[lo : lo + c], y[lo : lo + c]


def shard_by_index(batches: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """Batches with ``index % world_size == rank`` (evaluation: no gradient coupling)."""
    for i, b in enumerate(batches):
        if i % world_size == rank:
            yield b


def all_reduce(
    values: list[float], op: str = "sum", device: torch.device | None = None
) -> list[float]:
    """Sum (or max) Python numbers over ranks in float64 with one collective."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.tolist()


def reduce_train_metrics(m: dict[str, float], n: int, device: torch.device) -> dict[str, float]:
    """Global epoch metrics from each rank's ``train_epoch`` result over its ``n`` samples:
    sample-weighted loss and accuracy, the slowest rank's seconds."""
    if world()[1] == 1:
        return m
    loss_sum, correct, total = all_reduce(
        [m["loss"] * n, m["acc"] * n / 100.0, float(n)], device=device
    )
    (seconds,) = all_reduce([m["seconds"]], "max", device)
    return {
        **m,
        "loss": loss_sum / max(total, 1.0),
        "acc": 100.0 * round(correct) / max(total, 1),
        "seconds": seconds,
        "img_per_s": total / seconds if seconds > 0 else float("nan"),
    }


def reduce_eval_metrics(m: dict[str, float], device: torch.device) -> dict[str, float]:
    """Global ``evaluate`` result from each rank's shard (``acc`` in percent, mean ``loss``)."""
    if world()[1] == 1:
        return m
    n = float(m["n"])
    loss_sum, correct, total = all_reduce(
        [m["loss"] * n, round(m["acc"] * n / 100.0), n], device=device
    )
    return {
        "acc": 100.0 * round(correct) / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "n": int(total),
    }


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s full state (parameters, buffers, extra state such as
    quantizer bit widths and signedness): e.g. the calibrated qparams of rank 0."""
    if world()[1] == 1:
        return
    state = model.state_dict()
    obj = [
        {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}
        if world()[0] == src
        else None
    ]
    tdist.broadcast_object_list(obj, src=src)
    if world()[0] != src:
        model.load_state_dict(obj[0])


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
