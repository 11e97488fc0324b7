"""Vision Transformer for 32x32 images with every matrix product a named module.

Seed configuration (the ViT-on-CIFAR-10 study): patch 4 on 32x32 -> 64 patches +
a class token, dim 512, depth 6, 8 heads, MLP 512, dropout 0.1, pre-norm, GELU.
Its 38 quantizable ops, in execution order::

    patch_embed                         (Linear on flattened 4x4x3 patches)
    blocks.{i}.attn.qkv                 (Linear dim -> 3*dim)
    blocks.{i}.attn.qk                  (MatMul q @ k^T)
    blocks.{i}.attn.av                  (MatMul attn @ v)
    blocks.{i}.attn.proj                (Linear dim -> dim)
    blocks.{i}.mlp.fc1 / mlp.fc2        (Linear)
    head                                (Linear on the class token)

Attention is written as explicit matmul + softmax (no fused SDPA kernel), so
double backward and forward-mode AD work for Hessian-vector products.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.models.ops import MatMul


class Attention(nn.Module):
    """Multi-head self-attention with named ``qkv``, ``qk``, ``av``, ``proj`` ops."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av = MatMul()
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        scores = self.qk(q, k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
        attn = self.softmax(scores)
        out = self.av(attn, v)  # (B, nh, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.drop(self.proj(out))


class MLP(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT classifier for small images.

    Args:
        image_size: side of the square input image.
        patch_size: side of a square patch; ``(image_size/patch_size)^2`` patches.
        in_chans: input channels.
        num_classes: output classes.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_dim: hidden width of each MLP.
        dropout: dropout after the embedding, attention projection and in the MLP.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 512,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C*p*p) with patches in row-major order."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.patchify(x))  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)  # (B, N+1, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])  # (B, classes)
