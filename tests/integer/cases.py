"""Tiny fake-quant models shared by the integer tests (trained ones on real CIFAR-10)."""

from __future__ import annotations

import torch
from torch import nn

from hawq.engine import train_epoch
from hawq.models import ResNet, ViT
from hawq.quant import Plan, calibrate, quantize_


def tiny_vit() -> ViT:
    return ViT(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0)


def tiny_resnet() -> ResNet:
    return ResNet(depth=8, width=8)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def fake_quant(model: nn.Module, calib: torch.Tensor, plan: Plan | None = None,
               fold_bn: bool = True) -> nn.Module:  # fmt: skip
    """``quantize_`` + ``calibrate`` (PTQ) in eval mode."""
    model.eval()
    quantize_(model, plan or Plan(), None, fold_bn)
    calibrate(model, [(calib,)])
    return model.eval()


def train_tiny(model: nn.Module, loader, epochs: int, lr: float = 2e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        train_epoch(model, loader, opt, nn.CrossEntropyLoss(), torch.device("cpu"), amp=False)
    return model.eval()


def handwritten(qmodel: nn.Module, batches, residual_bits: int = 16, pack_int4: bool = True,
                max_batches: int = 4, margin: float = 1.25) -> nn.Module:
    """The hand-written integer ViT/ResNet of before the graph converter (the oracle)."""
    from . import handwritten_resnet, handwritten_vit
    from .handwritten_calibrate import observe_absmax

    mod = handwritten_vit if isinstance(qmodel, ViT) else handwritten_resnet
    cls = mod.IntegerViT if isinstance(qmodel, ViT) else mod.IntegerResNet
    qmodel.eval()
    found = observe_absmax(qmodel, batches, mod.calibration_points(qmodel), max_batches)
    import copy

    cpu = copy.deepcopy(qmodel).cpu().eval()
    return cls(cpu, mod.reduce_ranges(found, margin), residual_bits, pack_int4).eval()
