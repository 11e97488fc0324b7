"""The data object a config builds: splits + loaders for training and evaluation."""

from __future__ import annotations

from functools import cached_property

import torch

from hawq.data.cifar10 import load_cifar10
from hawq.data.dataset import Splits
from hawq.data.loader import BatchLoader
from hawq.data.synthetic import make_synthetic
from hawq.errors import HawqError


class ImageData:
    """CIFAR-10 from ``root`` (python or npz layout), or synthetic images.

    ``root`` wins when set, so ``data=synthetic data.root=<cifar10 folder>``
    runs the smoke sizes on real images. ``val_size=N`` holds the last N train images out
    of the train split as split ``val`` (before ``train_subset`` applies). Arguments mirror
    :class:`hawq.config.DataConfig`.
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str | None = None,
        download: bool = False,
        synthetic: bool = False,
        batch_size: int = 512,
        eval_batch_size: int = 1024,
        augment: bool = True,
        padding: int = 4,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        partial: bool = False,
        val_size: int | None = None,
    ) -> None:
        self.name, self.root, self.download, self.synthetic = name, root, download, synthetic
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.augment, self.padding = augment, padding
        self.train_subset, self.test_subset, self.seed = train_subset, test_subset, seed
        self.partial = partial
        self.val_size = val_size

    @cached_property
    def splits(self) -> Splits:
        """Loaded once, on first use."""
        if self.root is not None:
            s = load_cifar10(self.root, download=self.download, partial=self.partial)
        else:
            s = make_synthetic(
                n_train=self.train_subset or 1024, n_test=self.test_subset or 512, seed=self.seed
            )
        if self.val_size:  # the last val_size train images, never trained on
            if self.val_size >= len(s.train):
                raise HawqError(
                    f"data.val_size={self.val_size} is invalid; allowed: fewer "
                    f"than the {len(s.train)} train images"
                )
            s.train, s.val = s.train.split_off(self.val_size)
        s.train = s.train.subset(self.train_subset)
        s.test = s.test.subset(self.test_subset)
        return s

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.splits.input_size

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)

    def train_loader(self, device: torch.device | str = "cpu", seed: int = 0) -> BatchLoader:
        """Shuffled, augmented batches; epoch ``e`` is reproducible from ``seed``."""
        s = self.splits
        return BatchLoader(
            s.train,
            self.batch_size,
            s.mean,
            s.std,
            shuffle=True,
            augment=self.augment,
            drop_last=len(s.train) > self.batch_size,
            device=device,
            seed=seed,
            padding=self.padding,
        )

    def eval_loader(
        self, split: str = "test", device: torch.device | str = "cpu", batch_size: int | None = None
    ) -> BatchLoader:
        """Plain, ordered batches of ``split``: "train", "test" or "val" (the held-out tail
        of the train split, ``data.val_size``)."""
        s = self.splits
        if split == "val" and s.val is None:
            raise HawqError(
                "the val split needs data.val_size=N (the last N train images held out of training)"
            )
        data = {"test": s.test, "train": s.train, "val": s.val}[split]
        return BatchLoader(data, batch_size or self.eval_batch_size, s.mean, s.std, device=device)
