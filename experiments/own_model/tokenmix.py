"""A model of one's own, written the ordinary way, outside hawq.

Patches from a strided conv, then blocks whose products are all functional: attention by
``F.scaled_dot_product_attention``, token mixing by ``torch.einsum``, a channel MLP by
``F.linear`` on the block's own parameters, and ``@`` for the pooling query. hawq's
``prepare`` (``model=custom``) turns each into a named op: ``blocks.0.qk``,
``blocks.0.av``, ``blocks.0.einsum``, ``blocks.0.linear``...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, tokens: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mix = nn.Parameter(torch.eye(tokens) + 0.02 * torch.randn(tokens, tokens))
        self.w1 = nn.Parameter(torch.randn(2 * dim, dim) / dim**0.5)
        self.b1 = nn.Parameter(torch.zeros(2 * dim))
        self.w2 = nn.Parameter(torch.randn(dim, 2 * dim) / (2 * dim) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + a.transpose(1, 2).reshape(b, t, d)
        x = x + torch.einsum("st,btd->bsd", self.mix, x)  # token mixing
        h = F.gelu(F.linear(self.norm2(x), self.w1, self.b1))
        return x + F.linear(h, self.w2)


class TokenMix(nn.Module):
    def __init__(
        self, in_chans: int = 1, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 2,
        heads: int = 2, num_classes: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(Block(dim, tokens, heads) for _ in range(depth))
        self.query = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, T, dim)
        for block in self.blocks:
            x = block(x)
        weights = (x @ self.query).softmax(-1)  # attention pooling over tokens
        return self.head((weights.unsqueeze(-1) * x).sum(1))
