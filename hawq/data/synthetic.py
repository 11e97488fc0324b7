"""Synthetic CIFAR-shaped data for tests and smoke runs (no download, learnable).

Each class has a fixed random 8x8 colour template, upsampled to the image size;
a sample is its class template plus Gaussian pixel noise and a random shift, so
a small network learns it in a few epochs but not trivially in one step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawq.data.dataset import ImageSplit, Splits


def _make(n: int, templates: torch.Tensor, noise: float, g: torch.Generator) -> ImageSplit:
    k, c, h, w = templates.shape
    labels = torch.randint(0, k, (n,), generator=g)
    x = templates[labels] + noise * torch.randn(n, c, h, w, generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, tuple(s.tolist()), dims=(1, 2)) for xi, s in zip(x, shifts)])
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSplit(images, labels)


def make_synthetic(
    n_train: int = 1024,
    n_test: int = 512,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    noise: float = 0.25,
    seed: int = 0,
) -> Splits:
    """Build class-conditional random images.

    Args:
        n_train / n_test: split sizes.
        num_classes: number of labels.
        image_size: side of the square images.
        channels: image channels.
        noise: std of the per-pixel Gaussian noise on the [0, 1] scale.
        seed: fixes templates and samples.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 8, 8, generator=g)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    train = _make(n_train, templates, noise, g)
    test = _make(n_test, templates, noise, g)
    mean = tuple(train.images.float().mean(dim=(0, 2, 3)).div(255).tolist())
    std = tuple(train.images.float().std(dim=(0, 2, 3)).div(255).tolist())
    classes = tuple(f"class{i}" for i in range(num_classes))
    return Splits(train=train, test=test, classes=classes, mean=mean, std=std)
