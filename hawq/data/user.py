"""The user's own data set through the CLI: ``data=custom data.datasets._target_=...``.

The data protocol. ``datasets`` is any Hydra ``_target_`` (a function or class of the
user's own package) returning the splits as a mapping or a pair::

    def my_datasets(root: str, ...) -> dict:        # or (train, test)
        return {"train": train_set, "test": test_set}  # "val" optional

Each split is a ``torch.utils.data.Dataset`` (anything with ``__len__`` and
``__getitem__``) whose samples are ``(input, label)``: ``input`` a tensor of any
shape (the model's input: floats already normalised and augmented as the user wants, hawq
applies no transform, or integer token ids), or a dict of such tensors, the keyword inputs
of a model called ``model(**inputs)`` (a ``transformers`` model's ``input_ids`` and
``attention_mask``; the model config lists them, ``model.prepare.inputs``); ``label`` an
integer class. Batches are made by ``torch.utils.data.DataLoader`` (default collation:
dicts entry by entry), so every stage sees ``(x, y)`` batches as on CIFAR-10: training with
the configured optimizer and cross-entropy, evaluation by top-1 accuracy, curvature,
calibration, reconstruction, integer-only inference and export.

The loss hook: ``data.loss=mypkg.my_loss`` names ``fn(logits, labels) -> mean loss`` (or an
``nn.Module`` class) that replaces cross-entropy wherever the loss defines the result:
training, QAT (the label term beside distillation) and the curvature (Hessian, Fisher) that
ranks the ops. Evaluation still reports top-1 accuracy and cross-entropy.

A token model (``transformers`` BERT on ``(ids, label)`` samples, or on
``({input_ids, attention_mask}, label)`` samples of padded sequences) runs every stage through
the CLI, integer-only inference and export included (``experiments/own_model/run_bert.sh``,
``PADDED=1`` for the dict samples). Batches of other structures with a loss of their own
(``fn(model, batch)``) are supported by the library
(:class:`hawq.hessian.objective.BatchLoss`, ``calibrate``/``reconstruct_``/``allocate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader

from hawq.batches import to_device
from hawq.errors import HawqError

SPLITS = ("train", "test", "val")


def _as_splits(built: Any) -> dict[str, Any]:
    if isinstance(built, Mapping):
        splits = dict(built)
    elif isinstance(built, Sequence) and len(built) in (2, 3):
        splits = dict(zip(SPLITS, built))
    else:
        raise HawqError(
            f"data.datasets built a {type(built).__name__}; allowed: a mapping "
            "{'train': Dataset, 'test': Dataset[, 'val': Dataset]} or a (train, test) pair"
        )
    unknown = sorted(set(splits) - set(SPLITS))
    missing = [s for s in ("train", "test") if s not in splits]
    if unknown or missing:
        raise HawqError(
            f"data.datasets splits {sorted(splits)}: "
            + (f"missing {missing}" if missing else f"unknown {unknown}")
            + "; allowed: train, test and optionally val"
        )
    for name, ds in splits.items():
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")) or len(ds) == 0:
            raise HawqError(
                f"data.datasets split {name!r} is a {type(ds).__name__}: allowed a non-empty "
                "Dataset (__len__ and __getitem__)"
            )
    return splits


def build_loss(name: str):
    """The loss hook ``name`` names: a function ``fn(logits, labels) -> mean loss`` used as
    it is, or an ``nn.Module`` class built without arguments."""
    from hydra.utils import get_object

    try:
        obj = get_object(name)
    except Exception as e:  # noqa: BLE001 - Hydra raises several kinds
        raise HawqError(f"bad config data.loss={name!r}: cannot import it ({e})") from e
    if isinstance(obj, type):
        if not issubclass(obj, torch.nn.Module):
            raise HawqError(f"bad config data.loss={name!r}: a class that is not an nn.Module")
        return obj()
    if not callable(obj):
        raise HawqError(f"bad config data.loss={name!r}: not callable")
    return obj


class UserData:
    """Loaders over the user's own datasets, with the interface the stages use.

    Args:
        datasets: the built splits (Hydra instantiates the ``_target_`` first).
        name: recorded in results.
        batch_size / eval_batch_size: training and evaluation batch sizes.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle (with the run's seed).
        loss: the loss hook's dotted name (:func:`build_loss`); None: cross-entropy.
    """

    def __init__(
        self,
        datasets: Any,
        name: str = "custom",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        loss: str | None = None,
    ) -> None:
        self.datasets = _as_splits(datasets)
        self.loss = build_loss(loss) if loss else None
        self.name, self.batch_size, self.eval_batch_size = name, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed

    @cached_property
    def _first(self) -> tuple[Any, Any]:
        sample = self.datasets["train"][0]
        if not (isinstance(sample, tuple | list) and len(sample) == 2):
            raise HawqError(
                f"data.datasets: a train sample is a {type(sample).__name__}; allowed: an "
                "(input, integer label) pair, the input a tensor or a dict of tensors"
            )
        x, y = sample
        items = x.items() if isinstance(x, Mapping) else [("input", x)]
        if isinstance(x, Mapping) and not x:
            raise HawqError("data.datasets: a sample's input is an empty dict")
        for key, t in items:
            if not isinstance(t, torch.Tensor) or t.is_complex() or t.dtype == torch.bool:
                kind = type(t).__name__ + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else "")
                raise HawqError(
                    f"data.datasets: a sample's {key!r} is a {kind}; allowed: a float tensor "
                    "(images, features) or an integer one (token ids, attention masks), alone "
                    "or in a dict of keyword inputs (model(**inputs))"
                )
        return x, y

    @property
    def input_size(self) -> tuple[int, ...]:
        """One sample's input shape (a dict input: its first tensor's; the op probes of a
        prepared model feed its own example inputs, model.prepare.inputs)."""
        x = self._first[0]
        return tuple(next(iter(x.values())).shape if isinstance(x, Mapping) else x.shape)

    @cached_property
    def num_classes(self) -> int:
        labels = {int(self.datasets["train"][i][1]) for i in range(len(self.datasets["train"]))}
        return max(labels) + 1

    def _loader(self, split: str, batch_size: int, shuffle: bool, device) -> UserLoader:
        self._first  # noqa: B018 - validates the sample format once, with a clear message
        ds = self.datasets[split]
        return UserLoader(
            ds, batch_size, shuffle, shuffle and len(ds) > batch_size, device, self.num_workers
        )

    def train_loader(self, device: torch.device | str = "cpu", seed: int = 0) -> UserLoader:
        """Shuffled batches (epoch ``e``'s order from ``seed`` and ``e``) on ``device``."""
        loader = self._loader("train", self.batch_size, True, device)
        loader.seed = self.seed * 1_000_003 + seed
        return loader

    def eval_loader(
        self, split: str = "test", device: torch.device | str = "cpu", batch_size: int | None = None
    ) -> UserLoader:
        """Ordered batches of ``split`` (train, test, or val when the datasets have one)."""
        if split not in self.datasets:
            raise HawqError(
                f"data split {split!r}: the datasets have {sorted(self.datasets)}; add it "
                "to what data.datasets returns"
            )
        return self._loader(split, batch_size or self.eval_batch_size, False, device)


class UserLoader:
    """``(x, y)`` batches of a dataset on ``device``, with :class:`hawq.data.loader.BatchLoader`'s
    epoch protocol (``set_epoch``, resuming a stopped epoch at a step) for the train loop."""

    def __init__(
        self, dataset, batch_size: int, shuffle: bool, drop_last: bool, device, num_workers: int
    ) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.device, self.num_workers = drop_last, torch.device(device), num_workers
        self.seed, self.epoch, self.start_step = 0, 0, 0
        self.generator: torch.Generator | None = None

    def set_epoch(self, epoch: int, start_step: int = 0, generator_state=None) -> None:
        """Epoch ``epoch``'s order; the next iteration starts at batch ``start_step`` (no
        augmentation state here: the user's dataset owns its transforms)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        batches = [
            order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            for i in range(len(self))
        ]
        start, self.start_step = self.start_step, 0
        loader = DataLoader(
            self.dataset, batch_sampler=batches[start:], num_workers=self.num_workers
        )
        for x, y in loader:
            yield to_device(x, self.device), torch.as_tensor(y).long().to(self.device)
