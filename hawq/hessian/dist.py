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

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as tdist

from hawq.distributed import is_main, world

__all__ = ["all_reduce_sum", "is_main", "shard", "world"]

T = TypeVar("T")


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
