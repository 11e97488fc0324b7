"""Triton INT8 GEMM with int32 accumulation and a fused requantization epilogue.

``out[m, n] = requant(sum_k x[m, k] w[n, k] + bias[n])`` where ``requant`` is
:class:`hawq.integer.dyadic.Requant` per output channel ``n``:
``clamp(rshift_round(acc * M_n, E_n) + Z_n, LO_n, HI_n)`` (round half to even), computed
in int64 registers before the single int8 (or int32) store. The int4 variant reads
weights packed two per byte (low nibble = even ``k``) and unpacks them in the kernel
(Hopper has no INT4 tensor cores: the MMA itself is INT8).

Importing this module needs ``triton``; :mod:`hawq.integer.ops` imports it lazily. On a
CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is first imported), which the tests use to check it bit-exactly against the
reference path; on a GPU it compiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hawq.integer.dyadic import Requant

Tensor = torch.Tensor


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
    x_ptr, w_ptr, bias_ptr, m_ptr, e_ptr, z_ptr, lo_ptr, hi_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr, W_INT4: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
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
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)  # (BM, BK)
        if W_INT4:
            # packed byte j of row n holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
            rj = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(w_ptr + rn[None, :] * stride_wn + rj[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (rj[:, None] < (K + 1) // 2), other=0)
            p = p.to(tl.int32)
            lo = ((p & 15) ^ 8) - 8
            hi = (((p >> 4) & 15) ^ 8) - 8
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, BN)).to(tl.int8)
        else:
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)  # (BK, BN)
        acc += tl.dot(x, w)
    nmask = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0)[None, :]
    if REQUANT:
        res = requant_tile(acc, rn, nmask, m_ptr, e_ptr, z_ptr, lo_ptr, hi_ptr)
        res = res.to(out_ptr.dtype.element_ty)
    else:
        res = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, res,
             mask=(rm[:, None] < M) & nmask[None, :])


def _blocks(x: Tensor) -> dict[str, int]:
    if x.is_cuda:
        return {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    return {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}  # interpreter: small tiles


def gemm_requant(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    requant: Requant | None = None,
    k: int | None = None,
) -> Tensor:
    """``requant(x @ w^T + bias)`` in one kernel.

    Args:
        x: (M, K) int8.
        w: (N, K) int8, or (N, ceil(K/2)) uint8 packed int4 (then ``k`` = K is required).
        bias: (N,) int32 or None.
        requant: per-tensor or per-channel requantizer; None returns the int32 accumulator.
        k: the unpacked reduction length for packed int4 weights.

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
    cfg = _blocks(x)
    grid = (triton.cdiv(m_, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _gemm_requant_kernel[grid](
        x, w, b if b is not None else dummy,
        *(rq.m, rq.e, rq.z, rq.lo, rq.hi) if rq is not None else (dummy,) * 5,
        out, m_, n, kx, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=b is not None, REQUANT=rq is not None, W_INT4=int4, **cfg,
    )  # fmt: skip
    return out
