"""Batch augmentation and normalisation on uint8 tensors (CPU or GPU).

All randomness comes from an explicit ``torch.Generator`` so a resumed run sees
the same crops and flips as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip.

    Args:
        images: uint8 (B, C, H, W), on any device.
        padding: pixels of zero padding on each side before cropping back to H x W.
        flip: flip each image left-right with probability 1/2.
        generator: CPU generator; random offsets are drawn on CPU, then moved.

    Returns:
        uint8 (B, C, H, W) on the same device.
    """
    b, c, h, w = images.shape
    dev = images.device
    out = images
    if padding > 0:
        padded = F.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B,1,1,W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        out = padded[bi, ci, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(dev)[:, None, None, None]
        out = torch.where(mask, out.flip(-1), out)
    return out


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x/255 - mean) / std`` per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - m) / s
