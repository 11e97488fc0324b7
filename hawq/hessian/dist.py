"""Data parallelism for curvature estimates: shard batches, all-reduce sums.

Under ``torchrun --nproc_per_node N`` every rank iterates the same batches and
keeps those with ``index % N == rank``. A loader-average Hessian-vector product

.. math::  \\bar H v = \\frac{\\sum_b n_b H_b v}{\\sum_b n_b}

is then a sum of per-rank partial sums, so one all-reduce of the numerator and
of :math:`\\sum_b n_b` gives every rank the single-process result (up to the
order of floating-point additions). Random probe vectors are drawn from seeded
CPU generators, identical on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the rank that writes files."""
    return world()[0] == 0


def shard(batches: Iterable[T]) -> Iterator[T]:
    """This rank's batches: those with ``index % world_size == rank``."""
    rank, size = world()
    for i, b in enumerate(batches):
        if i % size == rank:
            yield b


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``tensors`` over ranks with one collective (flattened); identity when not distributed."""
    _, size = world()
    if size == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    tdist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def maybe_init(device: torch.device) -> bool:
    """Initialise the default process group when launched by ``torchrun``.

    Uses NCCL for CUDA devices and gloo otherwise. Returns True when running
    distributed (``WORLD_SIZE > 1``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True
