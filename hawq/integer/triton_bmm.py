"""Triton batched INT8 matmul with zero points and a fused requantization epilogue.

The activation x activation products of attention (``q @ k^T``, ``attn @ v``)::

    out[i, m, n] = requant(sum_k (a[i, m, k] - za) (b[i, k, n] - zb))

``a - za`` need not fit int8 (the softmax output is an unsigned grid stored shifted, with
``za = -128``), so the MMA runs on the raw int8 codes and the zero points are corrected
with the row sums of ``a`` and the column sums of ``b``, accumulated in the same K loop::

    sum_k (a_mk - za)(b_kn - zb) = sum_k a_mk b_kn - zb sum_k a_mk - za sum_k b_kn + K za zb

All four terms are int32. With int8 codes and zero points (``|a|, |b|, |za|, |zb| <= 2^7``)
each is at most ``K 2^14`` in magnitude, so the running total stays below ``4 K 2^14 =
2^29 < 2^31`` for ``K <= 8192`` (int32 arithmetic is modular anyway: only the final value
has to fit). The epilogue is :func:`hawq.integer.triton_gemm.requant_tile`, the linear
kernel's (per-tensor or per-column ``n`` multipliers, round half to even), before a single
store in ``requant.out_dtype`` (int8); without a requantizer the int32 accumulator is stored.

Operands are read through their strides, so ``b`` may be a transposed view of ``k``
(no copy). Leading dims are folded into two batch dims ``(B0, B1)`` (batch x heads), a view
for the strided ``q``, ``k``, ``v`` slices of attention; the program grid is
``(B0 * B1, M tiles x N tiles)``, the batch on axis 0 (no 65535 limit there); offsets are int64
and on CUDA the tiles are autotuned over :data:`BMM_CONFIGS` (16- to 128-row tiles: 65 tokens
fit a 16-row grid with 15 rows of padding instead of 63 in a 128-row tile). Needs
``triton``; on a CPU it runs under ``TRITON_INTERPRET=1`` (see :mod:`hawq.integer.triton_gemm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hawq.integer.dyadic import Requant
from hawq.integer.triton_gemm import (
    as_config,
    autotune_enabled,
    launch_kwargs,
    requant_tile,
    tile_offsets,
)

Tensor = torch.Tensor


@triton.jit
def _bmm_kernel(
    a_ptr,
    b_ptr,
    m_ptr,
    e_ptr,
    z_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    B1,
    M,
    N,
    K,
    za,
    zb,
    sa0,
    sa1,
    sam,
    sak,
    sb0,
    sb1,
    sbk,
    sbn,
    so0,
    so1,
    som,
    son,
    ZA: tl.constexpr,
    ZB: tl.constexpr,
    REQUANT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    i0, i1 = (pid // B1).to(tl.int64), (pid % B1).to(tl.int64)
    a_ptr += i0 * sa0 + i1 * sa1
    b_ptr += i0 * sb0 + i1 * sb1
    out_ptr += i0 * so0 + i1 * so1
    n_n = tl.cdiv(N, BN)
    rm = (tl.program_id(1) // n_n) * BM + tl.arange(0, BM)
    rn = (tl.program_id(1) % n_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + tile_offsets(rm, rk, sam, sak)  # (BM, BK), int64 offsets
    b_ptrs = b_ptr + tile_offsets(rk, rn, sbk, sbn)  # (BK, BN)
    a_step = tl.cast(sak, tl.int64) * BK
    b_step = tl.cast(sbk, tl.int64) * BK
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    row = tl.zeros((BM,), dtype=tl.int32)  # sum_k a[m, k]
    col = tl.zeros((BN,), dtype=tl.int32)  # sum_k b[k, n]
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0)
        b = tl.load(b_ptrs, mask=(k0 + rk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b)
        if ZB:
            row += tl.sum(a.to(tl.int32), axis=1)
        if ZA:
            col += tl.sum(b.to(tl.int32), axis=0)
        a_ptrs += a_step
        b_ptrs += b_step
    if ZB:
        acc -= zb * row[:, None]
    if ZA:
        acc -= za * col[None, :]
    if ZA and ZB:
        acc += K * za * zb
    nmask = rn < N
    if REQUANT:
        res = requant_tile(acc, rn, nmask, m_ptr, e_ptr, z_ptr, lo_ptr, hi_ptr)
        res = res.to(out_ptr.dtype.element_ty)
    else:
        res = acc
    tl.store(out_ptr + tile_offsets(rm, rn, som, son), res, mask=(rm[:, None] < M) & nmask[None, :])


# (BM, BN, BK, num_warps, num_stages): the autotune set on CUDA, keyed by (M, N, K). Attention
# has 65 tokens: a 128 tile wastes 63 of 128 rows, 16/32-row tiles waste 15 of 80 / 31 of 96,
# and the 64-row tiles leave a 1-row tail tile; the tuner picks per shape.
BMM_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 2),
    (64, 64, 64, 4, 2),
    (64, 128, 64, 4, 2),
    (32, 64, 64, 4, 2),
    (16, 64, 64, 4, 2),
    (32, 32, 32, 2, 2),
)
_TILES = ("BM", "BN", "BK")
# interpreter: numpy's per-op overhead dominates, so 64 (4x faster than 32)
INTERPRET_BLOCKS = {"BM": 64, "BN": 64, "BK": 64}

_bmm_tuned = triton.autotune(
    configs=[as_config(c, _TILES) for c in BMM_CONFIGS], key=["M", "N", "K"]
)(_bmm_kernel)


def _batch2(t: Tensor) -> Tensor:
    """(..., R, C) -> (B0, B1, R, C), a view unless the leading strides forbid it."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.flatten(0, -4)


def _channels(requant: Requant, n: int, dev: torch.device) -> Requant:
    rq = requant.channels(n).to(dev)
    if any(t.shape != (n,) for t in (rq.m, rq.e, rq.z, rq.lo, rq.hi)):
        raise ValueError(f"bmm_requant: requant fields must be scalars or ({n},) per column")
    return rq


def bmm_requant(
    a: Tensor,
    b: Tensor,
    za: int = 0,
    zb: int = 0,
    requant: Requant | None = None,
    config: dict[str, int] | None = None,
) -> Tensor:
    """``requant((a - za) @ (b - zb))`` in one kernel, batched over the leading dims.

    Args:
        a: (..., M, K) int8, any strides.
        b: (..., K, N) int8 with the same leading dims as ``a`` (no broadcasting).
        za, zb: zero points (int8 range).
        requant: per-tensor or per-column (N,) requantizer; None returns the int32 accumulator.
        config: explicit tiles (``BM, BN, BK`` [+ ``num_warps, num_stages``]); None autotunes
            over :data:`BMM_CONFIGS` on CUDA and uses 64-tiles in the interpreter.

    Returns:
        (..., M, N) in ``requant.out_dtype``, or int32.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"bmm_requant: int8 operands only, got {a.dtype} and {b.dtype}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"bmm_requant: shapes {tuple(a.shape)} @ {tuple(b.shape)} need equal "
            "leading dims and a.shape[-1] == b.shape[-2]"
        )
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    dev = a.device
    dtype = requant.out_dtype if requant is not None else torch.int32
    out = torch.empty((*a.shape[:-2], m, n), dtype=dtype, device=dev)
    a4, b4, o4 = _batch2(a), _batch2(b), _batch2(out)
    rq = _channels(requant, n, dev) if requant is not None else None
    fields = (rq.m, rq.e, rq.z, rq.lo, rq.hi) if rq is not None else (out,) * 5  # unread
    za, zb = int(za), int(zb)
    args = (
        a4,
        b4,
        *fields,
        o4,
        a4.shape[1],
        m,
        n,
        k,
        za,
        zb,
        *a4.stride(),
        *b4.stride(),
        *o4.stride(),
    )
    flags = {"ZA": za != 0, "ZB": zb != 0, "REQUANT": rq is not None}
    batch = a4.shape[0] * a4.shape[1]
    if config is None and a.is_cuda and autotune_enabled():
        grid = lambda meta: (batch, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]))  # noqa: E731
        _bmm_tuned[grid](*args, **flags)
        return out
    if config is None:
        config = launch_kwargs(BMM_CONFIGS[0], _TILES) if a.is_cuda else INTERPRET_BLOCKS
    if not a.is_cuda:  # the interpreter takes tile sizes only
        config = {key: v for key, v in config.items() if key in _TILES}
    grid = (batch, triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]))
    _bmm_kernel[grid](*args, **flags, **config)
    return out
