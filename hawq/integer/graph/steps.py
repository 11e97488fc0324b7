"""The integer steps a converted graph calls (each an ``nn.Module`` holding only integers).

They wrap the kernels of :mod:`hawq.integer.ops` and the integer layers of
:mod:`hawq.integer.layers` with one calling convention per role, so that
:mod:`hawq.integer.graph.lower` can place them in an ``fx`` graph.
"""

from __future__ import annotations

import torch
from torch import nn

from hawq.integer import ops
from hawq.integer.adapter import Grid
from hawq.integer.layers import IntConv2d, IntLinear, IntMatMul, IntRequant

Tensor = torch.Tensor


class Steps(nn.Module):
    """The container of a converted graph's steps (the graph calls them by name)."""


class QuantizeInput(nn.Module):
    """Float -> codes on ``grid`` (the only float -> integer step, before the graph)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        return self.grid.quantize(x)


class Requant(nn.Module):
    """``rq(x - zero_in)`` with per-channel parameters along ``channel_dim`` (``-1`` for
    linear outputs, ``1`` for NCHW conv outputs)."""

    def __init__(self, rq: IntRequant, zero_in: int = 0, channel_dim: int = -1) -> None:
        super().__init__()
        self.rq, self.zero_in, self.channel_dim = rq, int(zero_in), channel_dim

    def forward(self, x: Tensor) -> Tensor:
        acc = x.to(torch.int32) - self.zero_in if self.zero_in else x
        if self.channel_dim in (-1, x.dim() - 1):
            return self.rq(acc)
        return self.rq(acc.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)


class Linear(nn.Module):
    """:class:`~hawq.integer.layers.IntLinear` with its epilogue: a table (GELU onto the
    next grid) and/or a residual add clamped to ``+-limit``."""

    def __init__(self, layer: IntLinear, lut: Tensor | None = None, limit: int = 0) -> None:
        super().__init__()
        self.layer, self.limit = layer, limit
        self.register_buffer("lut", lut)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.layer(x, residual, self.limit, self.lut)


class Conv(nn.Module):
    """:class:`~hawq.integer.layers.IntConv2d` with an optional residual add (and ReLU)."""

    def __init__(self, layer: IntConv2d, limit: int = 0, relu: bool = False) -> None:
        super().__init__()
        self.layer, self.limit, self.relu = layer, limit, relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.layer(x, residual, self.limit, self.relu)


class MatMul(nn.Module):
    """:class:`~hawq.integer.layers.IntMatMul` (both operands activations)."""

    def __init__(self, layer: IntMatMul) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.layer(a, b)


class Lookup(nn.Module):
    """``table[x - lo]``: an exact elementwise function onto the next grid (GELU)."""

    def __init__(self, table: Tensor, lo: int) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.lo = int(lo)

    def forward(self, x: Tensor) -> Tensor:
        return self.table[x.to(torch.int64) - self.lo]


class Softmax(nn.Module):
    """:class:`~hawq.integer.softmax.IntSoftmax` then the requantization onto the next grid."""

    def __init__(self, softmax: nn.Module, rq: IntRequant) -> None:
        super().__init__()
        self.softmax, self.rq = softmax, rq

    def forward(self, x: Tensor) -> Tensor:
        return self.softmax(x, self.rq.requant)


class ResidualAdd(nn.Module):
    """``clamp(x + y, -limit, limit)`` (``[0, limit]`` with ReLU), both at the residual scale."""

    def __init__(self, limit: int, relu: bool = False) -> None:
        super().__init__()
        self.limit, self.relu = limit, relu

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        lo = 0 if self.relu else -self.limit
        return torch.clamp(x.to(torch.int32) + y.to(torch.int32), lo, self.limit)


class AddBias(nn.Module):
    """Scores plus a constant in accumulator units (a relative position bias, a mask):
    ``x + b``, int32."""

    def forward(self, x: Tensor, b: Tensor) -> Tensor:
        return x.to(torch.int32) + b.to(torch.int32)


class MaskFill(nn.Module):
    """Scores where ``mask`` holds set to ``value`` (accumulator units; -2^29 for -inf)."""

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = int(value)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x.to(torch.int32).masked_fill(mask.to(torch.bool), self.value)


class Clamp(nn.Module):
    """``clamp(x, lo, hi)``: a ReLU of a residual-stream value."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)


class Mean(nn.Module):
    """Integer mean over ``dims``, rounded half up: ``floor((sum + n/2) / n)``."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool) -> None:
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x: Tensor) -> Tensor:
        n = 1
        for d in self.dims:
            n *= x.shape[d]
        s = x.to(torch.int64).sum(dim=self.dims, keepdim=self.keepdim)
        return torch.div(s + n // 2, n, rounding_mode="floor").to(torch.int32)


class Attention(nn.Module):
    """Fused multi-head attention from a qkv projection: ``ops.int_attention`` (the same
    integers as its composition of linear, requant, matmul, softmax and matmul steps)."""

    def __init__(
        self,
        qkv: IntLinear,
        heads: int,
        zq: int,
        zk: int,
        zv: int,
        zp: int,
        softmax: nn.Module,
        p_rq: IntRequant,
        out_rq: IntRequant,
    ) -> None:
        super().__init__()
        self.qkv, self.heads, self.softmax = qkv, heads, softmax
        self.zq, self.zk, self.zv, self.zp = zq, zk, zv, zp
        self.p_rq, self.out_rq = p_rq, out_rq

    def forward(self, h: Tensor) -> Tensor:
        q = self.qkv
        return ops.int_attention(
            h,
            q.weight,
            q.bias,
            q.rq.requant,
            self.heads,
            self.zq,
            self.zk,
            self.zv,
            self.zp,
            self.softmax,
            self.p_rq.requant,
            self.out_rq.requant,
            k=q.k,
        )


class Dequantize(nn.Module):
    """Integers at real ``scale`` (per channel along ``channel_dim``) -> float32, for a
    float island (:mod:`hawq.integer.graph.islands`); ``relu`` clamps at 0 first."""

    def __init__(
        self, scale: Tensor, zero: int = 0, channel_dim: int = -1, relu: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float64))
        self.zero, self.channel_dim, self.relu = int(zero), channel_dim, relu

    def forward(self, x: Tensor) -> Tensor:
        v = x.to(torch.float64) - self.zero
        if self.relu:
            v = v.clamp(min=0)
        s = self.scale
        if s.dim() and self.channel_dim not in (-1, x.dim() - 1):
            s = s.reshape(-1, *([1] * (x.dim() - self.channel_dim - 1)))
        return (v * s).to(torch.float32)


class Quantize(nn.Module):
    """Float -> ``clamp(round(x / scale), lo, hi)`` integers (a float island's output onto
    the residual stream, a GELU input grid or the logits)."""

    def __init__(self, scale: float, lo: int, hi: int) -> None:
        super().__init__()
        self.scale, self.lo, self.hi = float(scale), int(lo), int(hi)

    def forward(self, x: Tensor) -> Tensor:
        q = torch.round(x.to(torch.float64) / self.scale)
        return torch.clamp(q, self.lo, self.hi).to(torch.int32)
