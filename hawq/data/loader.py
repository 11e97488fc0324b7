"""A tensor batch loader: shuffling, augmentation and normalisation on the device.

CIFAR-10 fits in memory (150 MB as uint8), so batches are slices of one tensor
moved to the device once; no worker processes, no per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hawq.data.augment import normalize, random_crop_flip
from hawq.data.dataset import ImageSplit


class BatchLoader:
    """Iterate ``(x, y)`` batches of one split.

    Args:
        split: the images and labels.
        batch_size: samples per batch.
        mean / std: per-channel normalisation.
        shuffle: draw a new permutation each epoch.
        augment: random crop (``padding`` pixels) + horizontal flip.
        drop_last: skip a final incomplete batch.
        device: where batches are produced.
        seed: base seed; epoch ``e`` uses ``seed + e`` so any epoch is reproducible.
        padding: crop padding for augmentation.

    Call :meth:`set_epoch` before iterating to pick the epoch's order.
    Re-iterating without ``set_epoch`` repeats the same batches, which is what
    Hessian estimators need.
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        padding: int = 4,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.padding = seed, padding
        self.epoch = 0
        self.start_step = 0
        self._resume_state: torch.Tensor | None = None
        self.generator: torch.Generator | None = None  # of the running iteration

    def set_epoch(
        self, epoch: int, start_step: int = 0, generator_state: torch.Tensor | None = None
    ) -> None:
        """Pick epoch ``epoch``'s order; with ``start_step`` the next iteration begins at
        that batch, its augmentation drawn from ``generator_state`` (what
        :attr:`generator` held after the first ``start_step`` batches of that epoch): the
        batches of a resumed epoch are the uninterrupted epoch's, bit for bit."""
        if start_step and self.augment and generator_state is None:
            raise ValueError("set_epoch: start_step of an augmented loader needs its state")
        self.epoch, self.start_step, self._resume_state = epoch, start_step, generator_state

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        start, self.start_step = self.start_step, 0  # a resume point serves one iteration
        if self._resume_state is not None:
            g.set_state(self._resume_state)
            self._resume_state = None
        self.generator = g
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, self.padding, True, g)
            yield normalize(x, self.mean, self.std), self.labels[idx]
