"""Triton INT8 GEMM with int32 accumulation and a fused requantization epilogue.

``out[m, n] = requant(sum_k x[m, k] w[n, k] + bias[n])`` where ``requant`` is
:class:`hawq.integer.dyadic.Requant` per output channel ``n``:
``clamp(rshift_round(acc * M_n, E_n) + Z_n, LO_n, HI_n)`` (round half to even), computed
in int64 registers before the single int8 (or int32) store. The int4 variant reads
weights packed two per byte (low nibble = even ``k``) and unpacks them in the kernel
(Hopper has no INT4 tensor cores: the MMA itself is INT8).

Pointer offsets are int64 (:func:`tile_offsets`): an operand may span more than ``2^31``
elements. On CUDA the tile shape is autotuned per (M, N, K) over :data:`GEMM_CONFIGS`
(``HAWQ_TRITON_AUTOTUNE=0`` pins the first); ``pip install hawq[gpu]`` brings triton.

Importing this module needs ``triton``; :mod:`hawq.integer.ops` imports it lazily. On a
CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is first imported), which the tests use to check it bit-exactly against the
reference path; on a GPU it compiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hawq.integer.dyadic import Requant

Tensor = torch.Tensor


@triton.jit
def tile_offsets(r0, r1, s0, s1):
    """Element offsets ``r0[:, None] * s0 + r1[None, :] * s1`` computed in int64.

    Row indices and strides arrive as int32 (Triton passes integer arguments below 2^31 as
    i32), so the plain product wraps once an offset passes ``2^31 - 1`` elements (e.g. a
    (66560 x 32768) int8 operand, or a batch of 1024 x 2^21 codes); promoting the indices
    first keeps every offset exact up to ``2^63``.
    """
    return r0.to(tl.int64)[:, None] * s0 + r1.to(tl.int64)[None, :] * s1


@triton.jit
def requant_tile(acc, rn, nmask, m_ptr, e_ptr, z_ptr, lo_ptr, hi_ptr):
    """``clamp(rshift_round(acc * m_n, e_n) + z_n, lo_n, hi_n)`` for the columns ``rn``.

    ``acc`` is an int32 (BM, BN) tile; the fields are (N,) int64 vectors
    (``Requant.channels``); the result is int64 (round half to even, as ``rshift_round``).
    """
    mult = tl.load(m_ptr + rn, mask=nmask, other=0)[None, :]
    sh = tl.load(e_ptr + rn, mask=nmask, other=0)[None, :]
    v = acc.to(tl.int64) * mult
    q = v >> sh
    r = v - (q << sh)
    half = (tl.full(sh.shape, 1, tl.int64) << sh) >> 1
    up = (r > half) | ((r == half) & (half > 0) & ((q & 1) == 1))
    q = q + up.to(tl.int64) + tl.load(z_ptr + rn, mask=nmask, other=0)[None, :]
    q = tl.maximum(q, tl.load(lo_ptr + rn, mask=nmask, other=0)[None, :])
    q = tl.minimum(q, tl.load(hi_ptr + rn, mask=nmask, other=0)[None, :])
    return q


@triton.jit
def _gemm_requant_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    m_ptr,
    e_ptr,
    z_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    REQUANT: tl.constexpr,
    W_INT4: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: neighbouring programs share W tiles in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # int64 offsets, then pointers advanced by one K step per iteration (tile_offsets)
    x_ptrs = x_ptr + tile_offsets(rm, rk, stride_xm, stride_xk)  # (BM, BK)
    if W_INT4:
        # packed byte j of row n holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
        rj = tl.arange(0, BK // 2)
        w_ptrs = w_ptr + tile_offsets(rj, rn, stride_wk, stride_wn)  # (BK / 2, BN)
        w_step = tl.cast(stride_wk, tl.int64) * (BK // 2)
    else:
        w_ptrs = w_ptr + tile_offsets(rk, rn, stride_wk, stride_wn)  # (BK, BN)
        w_step = tl.cast(stride_wk, tl.int64) * BK
    x_step = tl.cast(stride_xk, tl.int64) * BK
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0)
        if W_INT4:
            p = tl.load(
                w_ptrs, mask=(rn[None, :] < N) & (k0 // 2 + rj[:, None] < (K + 1) // 2), other=0
            )
            p = p.to(tl.int32)
            lo = ((p & 15) ^ 8) - 8
            hi = (((p >> 4) & 15) ^ 8) - 8
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, BN)).to(tl.int8)
        else:
            w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (k0 + rk[:, None] < K), other=0)
        acc += tl.dot(x, w)
        x_ptrs += x_step
        w_ptrs += w_step
    nmask = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0)[None, :]
    if REQUANT:
        res = requant_tile(acc, rn, nmask, m_ptr, e_ptr, z_ptr, lo_ptr, hi_ptr)
        res = res.to(out_ptr.dtype.element_ty)
    else:
        res = acc.to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + tile_offsets(rm, rn, stride_om, stride_on),
        res,
        mask=(rm[:, None] < M) & nmask[None, :],
    )


# (BM, BN, BK, GROUP_M, num_warps, num_stages): the autotune set on CUDA, keyed by (M, N, K).
# 128x128 / 128x256 / 256x128 tiles for the ViT's 66560-row GEMMs, 64-row tiles for small M.
GEMM_CONFIGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 8, 4),
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 128, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
)
_TILES = ("BM", "BN", "BK", "GROUP_M")
INTERPRET_BLOCKS = {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}  # interpreter: small tiles


def autotune_enabled() -> bool:
    """``HAWQ_TRITON_AUTOTUNE=0`` pins the first config (no tuning runs on a new shape)."""
    return os.environ.get("HAWQ_TRITON_AUTOTUNE", "1") != "0"


def launch_kwargs(c: tuple[int, ...], names: tuple[str, ...]) -> dict[str, int]:
    """A ``(tiles..., num_warps, num_stages)`` row -> keyword arguments of a kernel launch."""
    *tiles, warps, stages = c
    return {**dict(zip(names, tiles)), "num_warps": warps, "num_stages": stages}


def as_config(c: tuple[int, ...], names: tuple[str, ...]) -> triton.Config:
    """A ``(tiles..., num_warps, num_stages)`` row -> :class:`triton.Config`."""
    kw = launch_kwargs(c, names)
    return triton.Config(
        {n: kw[n] for n in names}, num_warps=kw["num_warps"], num_stages=kw["num_stages"]
    )


_gemm_tuned = triton.autotune(
    configs=[as_config(c, _TILES) for c in GEMM_CONFIGS],
    key=["M", "N", "K"],
)(_gemm_requant_kernel)


def gemm_requant(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    requant: Requant | None = None,
    k: int | None = None,
    config: dict[str, int] | None = None,
) -> Tensor:
    """``requant(x @ w^T + bias)`` in one kernel.

    Args:
        x: (M, K) int8.
        w: (N, K) int8, or (N, ceil(K/2)) uint8 packed int4 (then ``k`` = K is required).
        bias: (N,) int32 or None.
        requant: per-tensor or per-channel requantizer; None returns the int32 accumulator.
        k: the unpacked reduction length for packed int4 weights.
        config: explicit tiles (``BM, BN, BK, GROUP_M`` [+ ``num_warps, num_stages``]); None
            autotunes over :data:`GEMM_CONFIGS` on CUDA and uses small tiles in the interpreter.

    Returns:
        (M, N) in ``requant.out_dtype``, or int32.
    """
    m_, kx = x.shape
    n = w.shape[0]
    int4 = w.dtype == torch.uint8
    if int4 and k != kx:
        raise ValueError("packed int4 weights need k equal to x.shape[1]")
    dev = x.device
    out = torch.empty((m_, n), dtype=requant.out_dtype if requant else torch.int32, device=dev)
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    rq = requant.channels(n).to(dev) if requant is not None else None
    b = bias.to(device=dev, dtype=torch.int32).contiguous() if bias is not None else None
    fields = (rq.m, rq.e, rq.z, rq.lo, rq.hi) if rq is not None else (dummy,) * 5
    args = (
        x,
        w,
        b if b is not None else dummy,
        *fields,
        out,
        m_,
        n,
        kx,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        out.stride(1),
    )
    flags = {"HAS_BIAS": b is not None, "REQUANT": rq is not None, "W_INT4": int4}
    if config is None and x.is_cuda and autotune_enabled():
        grid = lambda meta: (triton.cdiv(m_, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _gemm_tuned[grid](*args, **flags)
        return out
    if config is None:
        config = launch_kwargs(GEMM_CONFIGS[0], _TILES) if x.is_cuda else INTERPRET_BLOCKS
    if not x.is_cuda:  # the interpreter takes tile sizes only
        config = {key: v for key, v in config.items() if key in _TILES}
    grid = (triton.cdiv(m_, config["BM"]) * triton.cdiv(n, config["BN"]),)
    _gemm_requant_kernel[grid](*args, **flags, **config)
    return out
