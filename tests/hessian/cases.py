"""Tiny float64 cases whose dense Hessians are cheap: the oracles' inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hawq.models import ResNet, ViT


@dataclass
class Case:
    """A model in eval mode (float64), a loss and a list of batches."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]


def _init_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
            m.weight.data.copy_(1 + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))


def mlp(n_batches: int = 1, batch: int = 6, seed: int = 0) -> Case:
    """2-layer tanh MLP, cross-entropy: 5 -> 4 -> 3 (39 parameters)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    batches = [(torch.randn(batch, 5, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (batch,), generator=gen))
               for _ in range(n_batches)]  # fmt: skip
    return Case("mlp", model, nn.CrossEntropyLoss(), batches)


def vit(n_batches: int = 1, batch: int = 3, seed: int = 0) -> Case:
    """One-block ViT on 8x8 images (4 tokens + cls, dim 8, 2 heads): 914 op parameters."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=8, num_classes=10,
                dropout=0.0).double().eval()  # fmt: skip
    batches = [(torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(n_batches)]  # fmt: skip
    return Case("vit", model, nn.CrossEntropyLoss(), batches)


def cnn(n_batches: int = 1, batch: int = 2, seed: int = 0) -> Case:
    """ResNet-8 of width 2 with BatchNorm in eval mode on 8x8 images (~350 op parameters)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet(depth=8, width=2, num_classes=4).double()
    _init_bn(model, gen)
    model.eval()
    batches = [(torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 4, (batch,), generator=gen))
               for _ in range(n_batches)]  # fmt: skip
    return Case("cnn", model, nn.CrossEntropyLoss(), batches)


def sum_sq_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:math:`\\frac1N \\sum_n \\lVert o_n - y_n \\rVert^2` (squared error summed over outputs)."""
    return ((out - y) ** 2).sum(dim=1).mean()


def linear_mse(n: int = 7, d_in: int = 4, d_out: int = 3, seed: int = 0) -> Case:
    """One ``nn.Linear`` with squared-error loss: its Hessian has a closed form."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double().eval()
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return Case("linear_mse", model, sum_sq_mean, [(x, y)])


def deep_linear(n_batches: int = 2, batch: int = 6, seed: int = 0) -> Case:
    """Two stacked ``nn.Linear`` with squared error: PSD diagonal blocks (each layer alone is
    linear in its weights) with non-zero cross blocks."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double().eval()
    batches = [(torch.randn(batch, 5, generator=gen, dtype=torch.float64),
                torch.randn(batch, 3, generator=gen, dtype=torch.float64))
               for _ in range(n_batches)]  # fmt: skip
    return Case("deep_linear", model, sum_sq_mean, batches)


CASES = {"mlp": mlp, "vit": vit, "cnn": cnn}


class DenseBlocks:
    """An explicit matrix with named diagonal blocks, standing in for a HessianOperator
    (``@``, ``blocks``, ``shape``, ``dtype``, ``device``) in estimator tests."""

    def __init__(self, a: torch.Tensor, blocks: dict) -> None:
        self.a, self.blocks, self.shape = a, blocks, a.shape
        self.dtype, self.device = a.dtype, "cpu"

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.a @ v


def func_looks_faster(monkeypatch) -> None:
    """Patch ``time.perf_counter`` to a clock that runs 1 s further per double-backward
    product and 1 ms per ``torch.func`` product: any choice made by timing picks ``func``."""
    import time

    from hawq.hessian.hvp import DoubleBackwardHVP, FuncHVP

    extra = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + extra[0])
    for cls, cost in ((DoubleBackwardHVP, 1.0), (FuncHVP, 1e-3)):

        def timed(self, vs, idx, _call=cls.__call__, _cost=cost):
            extra[0] += _cost
            return _call(self, vs, idx)

        monkeypatch.setattr(cls, "__call__", timed)
