"""A data set of one's own, outside hawq: oriented stripes under noise (4 classes).

``datasets(n_train, n_test, size, noise, seed)`` returns ``{"train": ..., "test": ...}``
of ``(image, label)`` samples: ``image`` a float tensor (1, size, size), ``label`` the
stripe orientation (0: horizontal, 1: vertical, 2 and 3: the diagonals). Generated, so it
needs no download; hard enough that a linear model does not solve it at high noise.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset


def _images(n: int, size: int, noise: float, g: torch.Generator) -> TensorDataset:
    labels = torch.randint(0, 4, (n,), generator=g)
    angle = labels.float() * (math.pi / 4) + 0.15 * torch.randn(n, generator=g)
    freq = 0.6 + 0.5 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = xs * torch.sin(angle)[:, None, None] + ys * torch.cos(angle)[:, None, None]
    x = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    x = x + noise * torch.randn(x.shape, generator=g)
    return TensorDataset(x.unsqueeze(1), labels)


def datasets(
    n_train: int = 2048, n_test: int = 512, size: int = 16, noise: float = 1.0, seed: int = 0
) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    return {"train": _images(n_train, size, noise, g), "test": _images(n_test, size, noise, g)}
