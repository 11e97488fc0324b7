"""Integer kernels: the one module through which every integer GEMM/conv is reached.

Semantics (every backend must match them bit for bit)::

    int_linear(x, w, b, rq)      = rq(x @ w^T + b)                  x int8 (..., K), w int8 (N, K)
    int_matmul(a, b, za, zb, rq) = rq((a - za) @ (b - zb))          a (..., M, K), b (..., K, N)
    int_conv2d(x, w, b, rq)      = rq(conv2d(pad(x, value=pad_value), w) + b)

Accumulators are int32 (the bounds of :mod:`hawq.integer.dyadic` make overflow impossible
for the layers :mod:`hawq.integer.convert` builds); ``rq`` is a
:class:`~hawq.integer.dyadic.Requant` (None returns the int32 accumulator).

Backends:

* ``reference`` -- CPU or GPU: the products in float64 on integer values, exact because
  every partial sum is an integer below ``2^53``, and int64 torch ops for the rest. This
  path *defines* the semantics.
* ``cpu`` -- :mod:`hawq.integer.cpu`: oneDNN INT8 GEMMs/convs (AMX/VNNI) and the fused
  C++ epilogue (bias, requantization, GELU table, residual add in one pass), C++ softmax
  and LayerNorm rows.
* ``int_mm`` -- ``torch._int_mm`` (int8 x int8 -> int32), then the requantization in
  int64 torch ops: the baseline for GPU speed.
* ``triton`` -- the fused kernel of :mod:`hawq.integer.triton_gemm` (int8 or packed int4
  weights); on a CPU it needs ``TRITON_INTERPRET=1``.
* ``auto`` -- on CUDA ``triton`` when it imports, else ``int_mm``. On a CPU, by
  measurement: at first use :func:`cpu_choice` times one ViT-like GEMM + requantization
  (M=520, K=N=256) on ``reference`` and ``cpu`` and keeps the faster (``cpu``: ~0.1-0.3 ms
  vs ~1.2-2 ms on the Xeons we have); ``reference`` when the extension cannot be built.
* FP8 (:func:`fp8_linear`, float8 codes): ``reference`` sums the products of the decoded
  codes in float64 and defines the semantics; every other backend (``auto`` on CUDA
  included) runs ``torch._scaled_mm`` with fp32 accumulation.

``int_matmul`` (the activation x activation products of attention) runs on ``triton`` as
the batched INT8 kernel of :mod:`hawq.integer.triton_bmm` (zero points corrected with row
and column sums, fused requantization); on ``int_mm`` it runs as an fp32 GEMM on integer
values, exact while ``K * 255^2 < 2^24`` (K <= 258, true for head dims), else in float64.
Convolutions off the reference path are lowered to ``int_linear`` by im2col.

Int4 weights are stored packed two per byte (:func:`pack_int4`); the reference path
unpacks them, the Triton kernel unpacks in registers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hawq.integer.dyadic import Requant

Tensor = torch.Tensor

BACKENDS = ("auto", "reference", "int_mm", "triton", "cpu")
_backend = os.environ.get("HAWQ_INT_BACKEND", "auto")
_FP32_EXACT_K = 258  # K * 255^2 < 2^24


def set_backend(name: str) -> None:
    """Select the kernel backend for all later calls (see the module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"integer backend {name!r}; allowed: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside the block."""
    prev = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def triton_available() -> bool:
    """True when ``triton`` imports (on CPU, kernels also need ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


_cpu_choice: dict[str, float | str] = {}


def cpu_choice() -> str:
    """The CPU backend ``auto`` uses: the fastest of ``reference``, ``int_mm`` and ``cpu``
    (when its C++ extension builds; ``int_mm`` needs no compiler) on one timed
    GEMM + requantization (12 interleaved calls of each after 3 warm-up rounds, the minimum:
    what other processes on a shared machine disturb least -- a descheduled OpenMP thread
    stalls a 2-thread call by a whole scheduler quantum), measured once per process; the
    timings are kept in ``_cpu_choice`` for reporting."""
    if "choice" in _cpu_choice:
        return str(_cpu_choice["choice"])
    import time

    from hawq.integer import cpu

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (520, 256), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (256, 256), generator=g, dtype=torch.int8)
    b = torch.randint(-1000, 1000, (256,), generator=g, dtype=torch.int32)
    rq = Requant.from_scale(torch.full((256,), 1e-3, dtype=torch.float64))
    # without a compiler (no C++ extension) int_mm (torch._int_mm) is the fast candidate
    names = ("reference", "int_mm", "cpu") if cpu.available() else ("reference", "int_mm")
    best = dict.fromkeys(names, float("inf"))
    for i in range(15):  # interleaved, so both see the same load; 3 warm-up rounds
        for name in best:
            with backend(name):
                t = time.perf_counter()
                int_linear(x, w, b, rq)
                if i >= 3:
                    best[name] = min(best[name], time.perf_counter() - t)
    _cpu_choice.update(best)
    _cpu_choice["choice"] = min(names, key=lambda n: _cpu_choice[n])
    return str(_cpu_choice["choice"])


def kernel_report(device: torch.device | str = "cpu") -> dict:
    """What runs the integer ops here: the backend ``auto`` resolves to, the CPU and its
    INT8 ISA families (``ONEDNN_MAX_CPU_ISA`` applied), the GEMM kernel measured fastest and
    the timings behind both choices. Logged once per process by the stages; written into
    ``results.json`` and the benchmark JSONs."""
    from hawq.integer import cpu, isa

    probe = torch.zeros(1, dtype=torch.int8, device=device)
    report: dict = {"requested": _backend, "resolved": resolve(probe), "isa": isa.describe()}
    if report["resolved"] == "cpu":
        report["gemm"] = cpu.gemm_choice()
        report["gemm_seconds"] = dict(cpu._gemm_choice["seconds"])
    if _cpu_choice:
        report["auto_seconds"] = {k: v for k, v in _cpu_choice.items() if k != "choice"}
    return report


def resolve(x: Tensor) -> str:
    """The backend that runs for tensors like ``x`` (``auto`` resolved)."""
    if _backend != "auto":
        return _backend
    if not x.is_cuda:
        return cpu_choice()
    return "triton" if triton_available() else "int_mm"


_resolve = resolve


# ---------------------------------------------------------------- int4 packing


def pack_int4(w: Tensor) -> Tensor:
    """Pack int4 values (int8 tensor in [-8, 7]) two per byte along the last dimension.

    Byte ``j`` holds element ``2j`` in its low nibble and ``2j + 1`` in its high nibble
    (two's complement); an odd length is padded with a zero.

    Returns:
        uint8 tensor of shape ``(..., ceil(K / 2))``.
    """
    if w.numel() and (w.min() < -8 or w.max() > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    w = w.to(torch.int16)
    if w.shape[-1] % 2:
        w = F.pad(w, (0, 1))
    lo = w[..., 0::2] & 0xF
    hi = w[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., ceil(k/2))`` -> int8 ``(..., k)``."""
    p = p.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8  # sign-extend the nibble
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1)[..., :k].to(torch.int8)


def weight_int8(w: Tensor, k: int | None = None) -> Tensor:
    """Int8 weights, unpacking packed int4 (uint8) ones."""
    return unpack_int4(w, k if k is not None else 2 * w.shape[-1]) if w.dtype == torch.uint8 else w


# ---------------------------------------------------------------- kernels


def requant(acc: Tensor, rq: Requant) -> Tensor:
    """``rq(acc)`` over the last dim (the fused C++ loop on the ``cpu`` backend)."""
    if resolve(acc) == "cpu" and acc.dtype in (torch.int32, torch.int64, torch.float32):
        from hawq.integer import cpu

        return cpu.requant(acc, None, rq)
    return rq(acc)


def _finish(acc: Tensor, requant: Requant | None) -> Tensor:
    return requant(acc) if requant is not None else acc.to(torch.int32)


def int_linear(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    requant: Requant | None = None,
    k: int | None = None,
    lut: Tensor | None = None,
    residual: Tensor | None = None,
    limit: int = 0,
) -> Tensor:
    """``requant(x @ w^T + bias)`` with int32 accumulation, optionally followed by a table
    and a residual add: ``out = lut[out - lo]``, then ``clamp(out + residual, -limit, limit)``.

    Args:
        x: int8 (..., K).
        w: int8 (N, K), or uint8 (N, ceil(K/2)) packed int4.
        bias: int32 (N,) at scale ``s_x s_w`` (zero-point terms folded in), or None.
        requant: output requantizer, or None for the int32 accumulator.
        k: K for packed int4 weights (default ``x.shape[-1]``).
        lut: a table over ``[lo, hi]`` of a per-tensor ``requant`` (e.g. GELU then the next
            grid); its dtype is the output dtype.
        residual: int (..., N) added after, clamped to ``+-limit`` (int32 out).

    Returns:
        (..., N) in ``requant.out_dtype`` (int32 without ``requant``).
    """
    lead, kx = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, kx)
    be = _resolve(x)
    if be == "cpu" and requant is not None and x2.shape[0]:
        from hawq.integer import cpu

        acc = cpu.gemm(x2, _unpacked(w, k or kx))
        res = None if residual is None else residual.reshape(-1, acc.shape[-1])
        return cpu.requant(acc, bias, requant, lut, res, limit).reshape(*lead, -1)
    if lut is not None or residual is not None:
        out = int_linear(x, w, bias, requant, k)
        return _table_residual(out, requant, lut, residual, limit)
    if be == "triton":
        from hawq.integer.triton_gemm import gemm_requant

        k4 = kx if w.dtype == torch.uint8 else None
        out = gemm_requant(x2.contiguous(), w, bias, requant, k=k4)
        return out.reshape(*lead, -1)
    w8 = weight_int8(w, k or kx)
    if be == "int_mm" and x2.shape[0] > 16 and kx % 8 == 0 and w8.shape[0] % 8 == 0:
        acc = torch._int_mm(x2.contiguous(), w8.t().contiguous()).to(torch.int64)
    else:
        acc = (x2.to(torch.float64) @ w8.to(torch.float64).t()).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(acc.device, torch.int64)
    return _finish(acc, requant).reshape(*lead, -1)


def _table_residual(
    out: Tensor, rq: Requant, lut: Tensor | None, residual: Tensor | None, limit: int
) -> Tensor:
    """The reference semantics of ``int_linear``'s ``lut`` and ``residual``."""
    if lut is not None:
        out = lut[(out.to(torch.int64) - rq.lo.to(out.device))]
    if residual is not None:
        out = torch.clamp(out.to(torch.int32) + residual.to(torch.int32), -limit, limit)
    return out


def _unpacked(w: Tensor, k: int) -> Tensor:
    """Int8 weights, unpacking packed int4 once per weight tensor (cached)."""
    if w.dtype != torch.uint8:
        return w
    from hawq.integer import cpu

    return cpu._cached(w, ("int4", k), lambda: unpack_int4(w, k))


def int_matmul(
    a: Tensor,
    b: Tensor,
    za: int = 0,
    zb: int = 0,
    requant: Requant | None = None,
) -> Tensor:
    """``requant((a - za) @ (b - zb))`` with int32 accumulation (batched like ``matmul``).

    Args:
        a: int8 (..., M, K) codes with zero point ``za``.
        b: int8 (..., K, N) codes with zero point ``zb`` (on ``triton``: the leading dims
            of ``a``, no broadcasting).
    """
    be = _resolve(a)
    if be == "triton":
        from hawq.integer.triton_bmm import bmm_requant

        return bmm_requant(a, b, za, zb, requant)
    kk = a.shape[-1]
    if be == "cpu" and kk <= _FP32_EXACT_K:
        from hawq.integer import cpu

        acc = torch.matmul(a.to(torch.float32).sub_(za), b.to(torch.float32).sub_(zb))
        return acc.to(torch.int32) if requant is None else cpu.requant(acc, None, requant)
    dtype = torch.float64
    if be != "reference" and kk <= _FP32_EXACT_K:
        dtype = torch.float32
    acc = torch.matmul(a.to(dtype) - za, b.to(dtype) - zb).to(torch.int64)
    return _finish(acc, requant)


def int_attention(
    h: Tensor,
    w: Tensor,
    bias: Tensor | None,
    qkv_requant: Requant,
    heads: int,
    zq: int,
    zk: int,
    zv: int,
    zp: int,
    softmax: torch.nn.Module,
    p_requant: Requant,
    requant: Requant,
    k: int | None = None,
) -> Tensor:
    """Multi-head attention of int8 ``h`` (B, T, K), as the composition (the reference
    semantics)::

        qkv = int_linear(h, w, bias, qkv_requant, k)          (B, T, 3 heads hd) int8
        q | k | v = qkv.reshape(B, T, 3, heads, hd)            zero points zq, zk, zv
        P   = p_requant(softmax((q - zq) @ (k - zk)^T))        per head, int8, zero point zp
        out = requant((P - zp) @ (v - zv))                     (B, T, heads hd)

    ``softmax`` is an :class:`~hawq.integer.softmax.IntSoftmax`. On the ``cpu`` backend the
    qkv epilogue writes the three zero-point-corrected operands in head layout and softmax
    hands ``P - zp`` on as float32 (:func:`hawq.integer.cpu.attention`).
    """
    b, t, kx = h.shape
    n = w.shape[0]
    hd = n // (3 * heads)
    if (
        _resolve(h) == "cpu"
        and max(hd, t) <= _FP32_EXACT_K
        and kx <= 1024
        and b * t
        and p_requant.out_dtype == torch.int8
        and requant.out_dtype == torch.int8
    ):
        from hawq.integer import cpu

        return cpu.attention(
            h,
            _unpacked(w, k or kx),
            bias,
            qkv_requant,
            heads,
            zq,
            zk,
            zv,
            zp,
            softmax,
            p_requant,
            requant,
        )
    qkv = int_linear(h, w, bias, qkv_requant, k)
    q, kk, v = qkv.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
    scores = int_matmul(q, kk.transpose(-2, -1), zq, zk)  # (B, nh, T, T) int32
    p = softmax(scores, p_requant)
    out = int_matmul(p, v, zp, zv, requant)  # (B, nh, T, hd)
    return out.transpose(1, 2).reshape(b, t, -1)


def int_conv2d(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    requant: Requant | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int = 0,
    pad_value: int = 0,
    residual: Tensor | None = None,
    limit: int = 0,
    relu: bool = False,
) -> Tensor:
    """``requant(conv2d(pad(x, pad_value), w) + bias)``, channels on dim 1 (NCHW), then
    optionally a residual add ``clamp(out + residual, -limit, limit)`` (``[0, limit]`` with
    ``relu``; int32 out).

    Padding with the input zero point ``pad_value`` (the code of real 0) makes the
    zero-point correction folded into ``bias`` valid at the borders too.

    Args:
        x: int8 (B, C, H, W).
        w: int8 (N, C, kh, kw) (groups = 1).
        requant: applied per output channel (dim 1).
        residual: int (B, N, Ho, Wo) at the output's scale, or None.
    """
    n, _, kh, kw = w.shape
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    be = _resolve(x)
    if be == "cpu" and w[0].numel() <= 1024 and requant is not None:
        from hawq.integer import cpu

        acc = cpu.conv2d(x, w, (sh, sw), padding, pad_value)  # (B, N, Ho, Wo) f32, NHWC memory
        res = None if residual is None else residual.permute(0, 2, 3, 1)
        out = cpu.requant(acc.permute(0, 2, 3, 1), bias, requant, None, res, limit, relu)
        return out.permute(0, 3, 1, 2)
    if residual is not None:
        out = int_conv2d(x, w, bias, requant, stride, padding, pad_value)
        return torch.clamp(
            out.to(torch.int32) + residual.to(torch.int32), 0 if relu else -limit, limit
        )
    if padding:
        x = F.pad(x.to(torch.int16), (padding,) * 4, value=pad_value).to(torch.int8)
    if be == "reference":
        acc = F.conv2d(x.to(torch.float64), w.to(torch.float64), stride=(sh, sw)).to(torch.int64)
        if bias is not None:
            acc = acc + bias.to(acc.device, torch.int64).reshape(1, -1, 1, 1)
        if requant is None:
            return acc.to(torch.int32)
        return requant(acc.movedim(1, -1)).movedim(-1, 1)
    bsz, _, h, wd = x.shape
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    cols = F.unfold(x.to(torch.float32), (kh, kw), stride=(sh, sw))  # (B, C*kh*kw, L), exact
    cols = cols.transpose(1, 2).to(torch.int8)  # (B, L, C*kh*kw)
    out = int_linear(cols, w.reshape(n, -1), bias, requant)  # (B, L, N)
    return out.transpose(1, 2).reshape(bsz, n, ho, wo)


# ---------------------------------------------------------------- fp8


def fp8_linear(
    x8: Tensor,
    w8: Tensor,
    x_scale: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(x8 s_x) @ (w8 s_w)^T + bias`` on float8 codes (e4m3fn or e5m2, any pair).

    Semantics (the ``reference`` path): ``(x8 @ w8^T) * (s_x s_w) + bias`` in float64,
    rounded once to ``out_dtype``. The float64 dot product of e4m3 codes is exact (partial
    sums are multiples of ``2^-18`` below ``K 448^2``: exact for ``K < 2^17``); with e5m2
    operands it rounds at ``2^-53`` relative.

    Off the reference path: ``torch._scaled_mm`` with fp32 accumulation and an fp32 output,
    ``s_x`` and a per-tensor ``s_w`` as its tensorwise scales, a per-channel ``s_w`` and the
    bias applied after it in fp32 (CUDA takes row-wise scales only with a bf16 output, which
    would round the result to 8 bits). On CUDA, e5m2 x e5m2 (no kernel) falls back to the
    reference, and K, N are zero-padded to multiples of 16.

    Args:
        x8: float8 (..., K).
        w8: float8 (N, K).
        x_scale: float32 0-d.
        w_scale: float32 0-d or (N,).
        bias: float (N,) or None.

    Returns:
        (..., N) in ``out_dtype``.
    """
    lead, k = x8.shape[:-1], x8.shape[-1]
    x2 = x8.reshape(-1, k)  # (M, K)
    no_kernel = x8.is_cuda and x8.dtype == w8.dtype == torch.float8_e5m2
    if _resolve(x8) in ("reference", "cpu") or no_kernel:  # no fp8 GEMM kernel on a CPU
        out = _fp8_reference(x2, w8, x_scale, w_scale, bias)
    else:
        out = _fp8_scaled_mm(x2, w8, x_scale, w_scale, bias)
    return out.to(out_dtype).reshape(*lead, -1)


def _fp8_reference(
    x2: Tensor, w8: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    acc = x2.to(torch.float64) @ w8.to(torch.float64).t()  # (M, N), exact for e4m3
    out = acc * (x_scale.to(torch.float64) * w_scale.to(torch.float64))
    return out if bias is None else out + bias.to(torch.float64)


def _fp8_scaled_mm(
    x2: Tensor, w8: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    n = w8.shape[0]
    if x2.is_cuda:
        x2, w8 = _pad16(x2, 1), _pad16(_pad16(w8, 1), 0)
    per_channel = w_scale.numel() > 1
    s_b = torch.ones((), device=w8.device) if per_channel else w_scale.reshape(())
    out = torch._scaled_mm(
        x2.contiguous(),
        w8.contiguous().t(),
        scale_a=x_scale.float(),
        scale_b=s_b.float(),
        out_dtype=torch.float32,
    )[:, :n]
    if per_channel:
        out = out * w_scale.float()
    return out if bias is None else out + bias.float()


def _pad16(t: Tensor, dim: int) -> Tensor:
    """``t`` zero-padded along ``dim`` (0 or 1) to a multiple of 16 (zeros add nothing)."""
    size = t.shape[dim]
    if size % 16 == 0:
        return t
    shape = list(t.shape)
    shape[dim] = size + (-size) % 16
    out = t.new_zeros(shape)
    out.narrow(dim, 0, size).copy_(t)
    return out
