"""In-memory image splits: uint8 images + int64 labels, with their normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def split_off(self, n: int) -> tuple[ImageSplit, ImageSplit]:
        """``(first len - n samples, last n samples)``: a held-out tail."""
        if not 1 <= n < len(self):
            raise ValueError(f"cannot hold out {n} of {len(self)} samples")
        k = len(self) - n
        return (
            ImageSplit(self.images[:k], self.labels[:k]),
            ImageSplit(self.images[k:], self.labels[k:]),
        )

    def subset(self, n: int | None) -> ImageSplit:
        """The first ``n`` samples (all when ``n`` is None or larger)."""
        if n is None or n >= len(self):
            return self
        return ImageSplit(self.images[:n], self.labels[:n])


@dataclass
class Splits:
    """Train and test splits plus the metadata needed to normalise them."""

    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    val: ImageSplit | None = None  # held out of the train split (data.val_size)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]
