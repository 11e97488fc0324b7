"""Tiny models and batches shared by the quant tests."""

import torch

from hawq.models import ResNet, ViT


def tiny_vit() -> ViT:
    return ViT(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0)


def tiny_resnet() -> ResNet:
    return ResNet(depth=8, width=8)


def batches(n=4, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n)]  # fmt: skip
