"""Image classifiers written the ordinary way, as a user would write them.

None of these names its matrix products: attention goes through ``nn.TransformerEncoderLayer``
(``nn.MultiheadAttention`` inside), ``F.scaled_dot_product_attention`` or ``torch.matmul``;
the MLP is an ``nn.Sequential``; the patch embedding is a strided ``nn.Conv2d``. They are the
"your own model" cases of the tests and of the second study (``experiments/torch_vit_cifar``),
and reach hawq through :func:`hawq.models.own.prepared` like any model of the user's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class PatchStem(nn.Module):
    """Strided-conv patch embedding, class token and learned positions: (B, C, H, W) ->
    (B, 1 + N, D)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class TorchViT(nn.Module):
    """A pre-norm ViT from PyTorch's own ``nn.TransformerEncoderLayer`` (GELU, batch first).

    Args:
        image_size, patch_size, in_chans, num_classes: the image task.
        dim, depth, heads, mlp_dim: width, layers, attention heads, MLP hidden width.
        dropout: dropout inside the encoder layers.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = PatchStem(image_size, patch_size, in_chans, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.stem(x))[:, 0]))


class SdpaBlock(nn.Module):
    """Pre-norm block: fused-QKV attention through ``F.scaled_dot_product_attention`` (or
    ``torch.matmul`` with ``use_sdpa=False``), MLP as an ``nn.Sequential``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, use_sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.use_sdpa = heads, use_sdpa
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def attend(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            att = torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            o = torch.matmul(att.softmax(dim=-1), v)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SdpaViT(nn.Module):
    """A ViT of :class:`SdpaBlock` s (the functional-attention spelling)."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.stem = PatchStem(image_size, patch_size, in_chans, dim)
        self.blocks = nn.Sequential(
            *(SdpaBlock(dim, heads, mlp_dim, use_sdpa) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)))[:, 0])


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual stage with a strided shortcut, global pooling."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * w)
        self.conv2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.short = nn.Sequential(
            nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w)
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + self.short(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
