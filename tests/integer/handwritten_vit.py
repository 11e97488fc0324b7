"""The hand-written integer ViT that hawq shipped before the graph converter: the oracle
the generic path (:mod:`hawq.integer.graph`) must equal bit for bit (issue 30).

Integer-only ViT (the graph of :class:`hawq.models.vit.ViT` on integers).

Number formats (``R = 2^(rb-1) - 1`` with ``rb`` = ``residual_bits``, default 16)::

    image --Q(patch_embed grid)--> int8 patches                      (the only float -> int step)
    tokens = requant(patch_embed) at s_r; x = cat(cls_q, tokens) + pos_q   (one common scale s_r)
    block:  h  = IntLayerNorm(x)                  -> int8 on the qkv input grid
            q|k|v = requant_col(qkv(h))           -> int8 on the qk.a / qk.b / av.b grids
            sc = (q - z_q) @ (k - z_k)^T          int32; softmax scale s_q s_k / sqrt(d_h)
            p  = IntSoftmax(sc)                   int at 2^-16 -> requant -> int8 on the av.a grid
            o  = requant((p - z_p) @ (v - z_v))   -> int8 on the proj input grid
            x  = clamp(x + requant(proj(o)), +-R) residual add at s_r (fused in proj's epilogue)
            h  = IntLayerNorm(x) -> fc1 -> requant to the GELU grid (16 bits) -> GELU table
               (exact GELU and requant to the fc2 grid in one lookup, fused in fc1's epilogue)
               -> fc2 -> requant at s_r -> residual add (fused)
    logits = requant(head(IntLayerNorm(x[:, 0])))  int32 at s_logit (dequantized only for output)

Every GEMM has int8 operands and an int32 accumulator; the residual stream is int32
holding ``rb``-bit values at one scale ``s_r``, so additions and the class-token
concatenation need no rescaling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hawq.integer import adapter, ops
from hawq.integer.adapter import Grid
from hawq.integer.gelu import gelu_table
from hawq.integer.layernorm import IntLayerNorm
from hawq.integer.layers import (
    LOGIT_BITS,
    WIDE,
    IntegerModel,
    IntLinear,
    IntMatMul,
    IntRequant,
    WeightSpec,
    residual_format,
)
from hawq.integer.softmax import IntSoftmax

Tensor = torch.Tensor


def residual_add(x: Tensor, y: Tensor, limit: int, relu: bool = False) -> Tensor:
    """``clamp(x + y, -limit, limit)`` (``[0, limit]`` with ReLU): both at the residual scale."""
    return torch.clamp(x.to(torch.int32) + y.to(torch.int32), 0 if relu else -limit, limit)


def logit_head(spec: WeightSpec, absmax: float, pack_int4: bool = True) -> tuple[IntLinear, float]:
    """The classifier: int32 logits on a :data:`LOGIT_BITS` grid covering ``absmax``.

    Returns:
        The layer and its logit scale.
    """
    l_max = 2 ** (LOGIT_BITS - 1) - 1
    scale = max(absmax, 1e-6) / l_max
    rq = IntRequant(spec.act.scale * spec.scale / scale, 0, -l_max, l_max, torch.int32)
    return IntLinear(spec, rq, pack_int4), scale
GELU_BITS = 16


def _ln(norm: nn.LayerNorm, s_r: float, rb: int, grid: Grid) -> IntLayerNorm:
    return IntLayerNorm(norm.weight, norm.bias, norm.eps, s_r, rb, grid.scale, grid.zero,
                        grid.lo, grid.hi)  # fmt: skip


def _to_residual(spec: adapter.WeightSpec, s_r: float) -> IntRequant:
    return IntRequant(spec.act.scale * spec.scale / s_r, 0, -WIDE, WIDE, torch.int32)


class IntAttention(nn.Module):
    """Integer multi-head attention (see the module docstring)."""

    def __init__(self, attn: nn.Module, prefix: str, s_r: float, pack_int4: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = attn.heads, attn.head_dim
        qk = adapter.matmul_spec(f"{prefix}.qk", attn.qk)
        av = adapter.matmul_spec(f"{prefix}.av", attn.av)
        qkv = adapter.linear_spec(f"{prefix}.qkv", attn.qkv)
        proj = adapter.linear_spec(f"{prefix}.proj", attn.proj)
        self.in_grid = qkv.act
        d = attn.heads * attn.head_dim
        # per output column: q -> qk.a, k -> qk.b, v -> av.b
        grids = [qk.a] * d + [qk.b] * d + [av.b] * d
        tgt = torch.tensor([g.scale for g in grids], dtype=torch.float64)
        col = lambda key: torch.tensor([getattr(g, key) for g in grids])  # noqa: E731
        self.qkv = IntLinear(qkv, IntRequant(qkv.act.scale * qkv.scale / tgt, col("zero"),
                                             col("lo"), col("hi")), pack_int4)  # fmt: skip
        self.qk = IntMatMul(qk, None)
        self.softmax = IntSoftmax(qk.a.scale * qk.b.scale * attn.scale)
        self.p_rq = IntRequant.to_grid(self.softmax.out_scale, av.a)
        self.av = IntMatMul(av, IntRequant.to_grid(av.a.scale * av.b.scale, proj.act))
        self.proj = IntLinear(proj, _to_residual(proj, s_r), pack_int4)

    def forward(self, h: Tensor, x: Tensor, limit: int) -> Tensor:
        """``clamp(x + attn(h), +-limit)``: ``h`` the normed int8 input, ``x`` the residual."""
        qkv = self.qkv
        out = ops.int_attention(h, qkv.weight, qkv.bias, qkv.rq.requant, self.heads,
                                self.qk.za, self.qk.zb, self.av.zb, self.av.za, self.softmax,
                                self.p_rq.requant, self.av.rq.requant, k=qkv.k)  # fmt: skip
        return self.proj(out, x, limit)  # int32 at s_r (B, T, D) -> residual add


class IntMLP(nn.Module):
    """fc1 -> GELU table (onto the fc2 grid) -> fc2, ending at the residual scale."""

    def __init__(self, mlp: nn.Module, prefix: str, s_r: float, gelu_max: float,
                 pack_int4: bool) -> None:  # fmt: skip
        super().__init__()
        fc1 = adapter.linear_spec(f"{prefix}.fc1", mlp.fc1)
        fc2 = adapter.linear_spec(f"{prefix}.fc2", mlp.fc2)
        self.in_grid = fc1.act
        g_max = 2 ** (GELU_BITS - 1) - 1
        s_g = max(gelu_max, 1.0) / g_max  # below |x| = 1 the range would waste bits
        self.fc1 = IntLinear(fc1, IntRequant(fc1.act.scale * fc1.scale / s_g, 0, -g_max, g_max,
                                             torch.int32), pack_int4)  # fmt: skip
        g = fc2.act
        self.register_buffer("gelu", gelu_table(s_g, -g_max, g_max, g.scale, g.zero, g.lo, g.hi))
        self.fc2 = IntLinear(fc2, _to_residual(fc2, s_r), pack_int4)

    def forward(self, h: Tensor, x: Tensor, limit: int) -> Tensor:
        """``clamp(x + mlp(h), +-limit)``."""
        return self.fc2(self.fc1(h, lut=self.gelu), x, limit)


class IntBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, ``x + mlp(ln2(x))`` at the residual scale."""

    def __init__(self, block: nn.Module, prefix: str, s_r: float, rb: int, gelu_max: float,
                 pack_int4: bool) -> None:  # fmt: skip
        super().__init__()
        self.limit = 2 ** (rb - 1) - 1
        self.attn = IntAttention(block.attn, f"{prefix}.attn", s_r, pack_int4)
        self.mlp = IntMLP(block.mlp, f"{prefix}.mlp", s_r, gelu_max, pack_int4)
        self.norm1 = _ln(block.norm1, s_r, rb, self.attn.in_grid)
        self.norm2 = _ln(block.norm2, s_r, rb, self.mlp.in_grid)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x), x, self.limit)
        return self.mlp(self.norm2(x), x, self.limit)


class IntegerViT(IntegerModel):
    """Integer-only ViT built from a fake-quant :class:`~hawq.models.vit.ViT`.

    Args:
        qmodel: the fake-quant ViT (every op quantized by ``hawq.quant``).
        ranges: ``residual``, ``gelu.<i>`` and ``logits`` absmax (from calibration).
        residual_bits: bits of the residual stream (int32 storage).
        pack_int4: store <= 4-bit weights two per byte.
    """

    def __init__(self, qmodel: nn.Module, ranges: dict[str, float], residual_bits: int = 16,
                 pack_int4: bool = True) -> None:  # fmt: skip
        super().__init__()
        rb = residual_bits
        self.limit, self.s_r = residual_format(ranges["residual"], rb)
        s_r = self.s_r
        self.patch_size = qmodel.patch_size
        pe = adapter.linear_spec("patch_embed", qmodel.patch_embed)
        self.in_grid = pe.act
        self.patch_embed = IntLinear(pe, _to_residual(pe, s_r), pack_int4)
        lim = self.limit
        q = lambda t: torch.clamp(torch.round(t.detach().double().cpu() / s_r), -lim, lim)  # noqa: E731
        self.register_buffer("cls_q", q(qmodel.cls_token).to(torch.int32))
        self.register_buffer("pos_q", q(qmodel.pos_embed).to(torch.int32))
        self.blocks = nn.ModuleList(
            IntBlock(b, f"blocks.{i}", s_r, rb, ranges[f"gelu.{i}"], pack_int4)
            for i, b in enumerate(qmodel.blocks)
        )
        head = adapter.linear_spec("head", qmodel.head)
        self.norm = _ln(qmodel.norm, s_r, rb, head.act)
        self.head, self.logit_scale = logit_head(head, ranges["logits"], pack_int4)

    def quantize_input(self, images: Tensor) -> Tensor:
        """(B, C, H, W) float -> (B, N, C p p) int8 patches on the patch_embed grid."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.in_grid.quantize(x.reshape(b, (h // p) * (w // p), c * p * p))

    def forward_int(self, patches: Tensor) -> Tensor:
        """int8 patches -> int32 logits at :attr:`logit_scale` (integer-only)."""
        tokens = self.patch_embed(patches)  # (B, N, D) int32 at s_r
        cls = self.cls_q.expand(tokens.shape[0], -1, -1)
        x = residual_add(torch.cat([cls, tokens], dim=1), self.pos_q, self.limit)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def calibration_points(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Where :func:`hawq.integer.calibrate.observe_absmax` looks in a ViT."""
    points = {"logits": ("head", "output")}
    for i in range(len(model.blocks)):
        points[f"res.{i}.1"] = (f"blocks.{i}.norm1", "input")
        points[f"res.{i}.2"] = (f"blocks.{i}.norm2", "input")
        points[f"gelu.{i}"] = (f"blocks.{i}.mlp.fc1", "output")
    points["res.out"] = ("norm", "input")
    return points


def reduce_ranges(found: dict[str, float], margin: float = 1.25) -> dict[str, float]:
    """One residual range (max over the stream) and the others, widened by ``margin``."""
    out = {k: v * margin for k, v in found.items() if not k.startswith("res.")}
    out["residual"] = margin * max(v for k, v in found.items() if k.startswith("res."))
    out["logits"] = 2 * found["logits"]  # clipping a logit could tie the argmax
    return {k: (v if math.isfinite(v) else 1.0) for k, v in out.items()}
