"""The ``cpu`` backend of :mod:`hawq.integer.ops`: oneDNN INT8 GEMMs/convs (AMX/VNNI) and
fused integer epilogues compiled from ``csrc/int_cpu.cpp``.

**GEMMs.** ``torch.ops.onednn.qlinear_pointwise`` / ``qconv2d_pointwise`` (the kernels
inductor's x86 quantization uses; no ``torch.ao`` quantized tensors) multiply int8 (or
uint8 with zero point 128, the same integers) by int8 weights with an int32 accumulator
and write it out as float32 with unit scales. That conversion is exact while
``|acc| <= 2^24``; with ``|x|, |w| <= 128`` the GEMM part is at most ``K 2^14``, so the
backend uses oneDNN for ``K <= 1024`` (:data:`ONEDNN_MAX_K`) and ``torch._int_mm`` (int32
out) above. The bias is added later in int64, never inside oneDNN.

Measured (Xeon with AMX-INT8, 1 thread, ``benchmarks/bench_integer_cpu.py`` records the
2-thread numbers): M=4160 K=512 N=512 ``qlinear_pointwise`` ~2.2 TOPS vs ``torch._int_mm``
~1.2 TOPS vs fp32 ~0.17 TFLOPS; a 64-channel 3x3 conv on 8x8 maps 0.33 ms vs 1.9 ms fp32.

**Epilogues.** :func:`requant` computes ``lut?[clamp(rshift_round((acc + b) m, e) + z, lo,
hi)]`` (then an optional residual add, clamped to ``[-R, R]`` or ``[0, R]`` with ReLU) -- the
reference formulas of :mod:`hawq.integer.dyadic` verbatim, as explicit AVX-512 loops (8 int64
lanes) with a scalar path for other CPUs; softmax and LayerNorm rows likewise. Divisions by a
per-row constant are a float64 estimate plus one exact integer correction. All of it is
checked bit for bit against the reference by ``tests/integer/test_cpu_backend.py``.

**Attention.** :func:`attention` (``ops.int_attention``): on AVX-512 VNNI one fused kernel per
(image, head) -- both products as u8 x s8 ``vpdpbusd`` dot products with the zero points
corrected by row and column sums, softmax and both requantizations in between.

The extension is built with ``-fopenmp`` (ATen's ``parallel_for`` is a header template: without
it every kernel runs on one thread) and its first use calls :func:`keep_freed_memory`.
The extension is compiled once per machine (``torch.utils.cpp_extension``, cached); if
that fails, :func:`available` is False and ``ops.auto`` stays on the reference path.
"""

from __future__ import annotations

import functools
import os
import weakref
from pathlib import Path
from typing import Any

import torch

Tensor = torch.Tensor
ONEDNN_MAX_K = 1024  # K 2^14 <= 2^24: the float32 accumulator output is exact
_SRC = Path(__file__).with_name("csrc") / "int_cpu.cpp"


@functools.lru_cache(maxsize=1)
def ext() -> Any:
    """The compiled extension (raises when it cannot be built); first use also calls
    :func:`keep_freed_memory`. Built under :func:`~hawq.integer.build_lock.guarded_build`:
    a lock left by a killed build is removed with a message, never waited on."""
    from torch.utils.cpp_extension import load

    from hawq.integer.build_lock import guarded_build

    keep_freed_memory()

    flags = ["-O3", "-march=native", "-fno-strict-aliasing", "-fopenmp"]
    return guarded_build(
        "hawq_int_cpu",
        lambda name, folder: load(
            name,
            [str(_SRC)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        ),
    )


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks of up to 32 MB instead of returning them to the OS.

    An integer ViT step allocates and frees tens of MB of accumulators per layer; by default
    glibc serves blocks above its (adaptive) mmap threshold with fresh pages, and the page
    faults of a 25 MB accumulator cost more than its GEMM (seed ViT, batch 64, 2 threads:
    296 -> 181 ms per call). ``mallopt(M_MMAP_THRESHOLD, 32 MB)`` (glibc's maximum) and
    ``M_TRIM_THRESHOLD`` 1 GB keep them in the heap: the memory stays with the process.
    Process-wide, so every peer timed in the same process gets it too. Skipped with
    ``HAWQ_KEEP_MALLOC=1`` or off glibc; returns whether it was applied.
    """
    if os.environ.get("HAWQ_KEEP_MALLOC"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(
            libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):  # not glibc
        return False


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the extension builds and oneDNN's quantized ops exist."""
    if os.environ.get("HAWQ_NO_CPU_EXT"):
        return False
    try:
        ext()
        onednn = hasattr(torch.ops.onednn, "qlinear_pointwise")
        return onednn and torch.backends.mkldnn.is_available()
    except Exception:  # noqa: BLE001 - no compiler, no headers: the backend is unavailable
        return False


# ---------------------------------------------------------------- prepacked weights

_packed: dict[tuple, Tensor] = {}


def _cached(w: Tensor, key: tuple, make) -> Tensor:
    """``make()`` cached per weight tensor (its identity and version) and ``key``."""
    k = (id(w), w._version, w.data_ptr(), *key)
    got = _packed.get(k)
    if got is None:
        got = make()
        _packed[k] = got
        weakref.finalize(w, _packed.pop, k, None)
    return got


def _ones(n: int) -> Tensor:
    return torch.ones(n, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _unit(n: int) -> tuple[Tensor, Tensor]:
    return _ones(n), torch.zeros(n, dtype=torch.int64)


def _onednn(x: Tensor, w: Tensor, zero_point: int) -> Tensor:
    """oneDNN ``qlinear_pointwise`` of int8 codes (``zero_point`` 0) or of the same integers
    as uint8 codes with zero point 128; the int32 accumulator written as float32."""
    n = w.shape[0]
    wp = _cached(w, ("lin",), lambda: torch.ops.onednn.qlinear_prepack(w.contiguous(), None))
    one, zero = _unit(n)
    xin = to_u8(x.contiguous()) if zero_point else x.contiguous()
    return torch.ops.onednn.qlinear_pointwise(
        xin, 1.0, zero_point, wp, one, zero, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _int_mm_fits(m: int, k: int, n: int) -> bool:
    return m > 16 and k % 8 == 0 and n % 8 == 0


def _int_mm(x: Tensor, w: Tensor) -> Tensor:
    wt = _cached(w, ("t",), lambda: w.t().contiguous())
    return torch._int_mm(x.contiguous(), wt)


def gemm_with(kernel: str, x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` for int8 ``x`` (M, K) and ``w`` (N, K) with one of :data:`GEMM_KERNELS`:
    float32 (exact) or int32. ``int_mm`` falls back to ``onednn_u8`` where its shape rules
    fail; K above :data:`ONEDNN_MAX_K` always takes ``int_mm`` (or float64 products)."""
    m, k = x.shape
    n = w.shape[0]
    if k > ONEDNN_MAX_K:
        if _int_mm_fits(m, k, n):
            return _int_mm(x, w)
        return (x.double() @ w.double().t()).to(torch.int64)
    if kernel == "int_mm" and _int_mm_fits(m, k, n):
        return _int_mm(x, w)
    return _onednn(x, w, 0 if kernel == "onednn_s8" else 128)


GEMM_KERNELS = ("onednn_s8", "onednn_u8", "int_mm")
SLOW_PROBE_S = 0.005  # a 64x256x256 call above this is a reference kernel (fast: ~10 us)
_gemm_choice: dict[str, Any] = {}


def gemm_candidates() -> list[str]:
    """:data:`GEMM_KERNELS` worth timing here: int8 activations in oneDNN only where it may
    use AMX (elsewhere they meet ``ref_int8``: measured on Zen 4 under every cap)."""
    from hawq.integer import isa

    amx = isa.family() == "AVX512_CORE_AMX"
    return [k for k in GEMM_KERNELS if k != "onednn_s8" or amx]


def gemm_choice() -> str:
    """The INT8 GEMM kernel of this process: the fastest of :func:`gemm_candidates` on a
    ViT-like probe (M=520, K=N=256), measured once (minimum of 8 interleaved calls).
    A 64-row call first weeds out reference kernels (see below).

    Why measured: oneDNN's kernel depends on the ISA and the activation type. With int8
    (s8) activations it runs AMX on Sapphire Rapids but its reference kernel
    (``ref_int8``, ~0.2 GOPS) on AVX-512 VNNI without AMX (Zen 4) and on AVX2; uint8
    codes with zero point 128 (the same integers) run ``brg_matmul`` there; and
    ``torch._int_mm`` is the fastest of all on some of them. A candidate whose second 64-row call
    takes more than :data:`SLOW_PROBE_S` is a reference kernel and is not timed further.
    Every kernel gives the same integers, so the choice never changes a result. The
    timings and the CPU are kept in ``_gemm_choice`` (``ops.kernel_report``)."""
    if "choice" in _gemm_choice:
        return str(_gemm_choice["choice"])
    with torch.inference_mode(False):  # the probe's tensors must be plain ones
        _measure_gemm_kernels()
    return str(_gemm_choice["choice"])


def _measure_gemm_kernels() -> None:
    import time

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (256, 256), generator=g, dtype=torch.int8)
    small = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int8)
    best: dict[str, float] = {}
    errors: dict[str, str] = {}
    for kernel in gemm_candidates():  # the second call: the first one JIT-compiles the kernel
        try:
            for _ in range(2):
                t = time.perf_counter()
                gemm_with(kernel, small, w)
                second = time.perf_counter() - t
        except RuntimeError as e:  # this torch/oneDNN lacks the op: not a candidate
            errors[kernel] = str(e).splitlines()[0]
            continue
        best[kernel] = second * 520 / 64 if second > SLOW_PROBE_S else float("inf")
    fast = [k for k, v in best.items() if v == float("inf")]
    x = torch.randint(-128, 128, (520, 256), generator=g, dtype=torch.int8)
    for _ in range(8):  # interleaved, so all see the same load
        for kernel in fast:
            t = time.perf_counter()
            gemm_with(kernel, x, w)
            best[kernel] = min(best[kernel], time.perf_counter() - t)
    if not best:
        raise RuntimeError(f"no INT8 GEMM kernel runs on this CPU: {errors}")
    _gemm_choice.update(seconds=best, choice=min(best, key=best.__getitem__), errors=errors)


def gemm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` with the kernel measured fastest on this CPU (:func:`gemm_choice`)."""
    return gemm_with(gemm_choice(), x, w)


def to_u8(x: Tensor) -> Tensor:
    """int8 codes as uint8 codes with zero point 128 (``x + 128``, a bit flip)."""
    return x.view(torch.uint8).bitwise_xor(128)


def conv2d(x: Tensor, w: Tensor, stride: tuple[int, int], padding: int, pad_value: int) -> Tensor:
    """``conv2d(pad(x, pad_value), w)`` (NCHW int8): float32 (exact), channels-last layout."""
    k = w[0].numel()
    if k > ONEDNN_MAX_K:
        raise ValueError("cpu.conv2d: K above ONEDNN_MAX_K")
    if padding:  # one pass: pad with the zero point and flip to uint8, channels-last
        xu = ext().pad_u8(x.permute(0, 2, 3, 1), padding, pad_value).permute(0, 3, 1, 2)
    else:
        xu = to_u8(x)
    n = w.shape[0]
    key = ("conv", tuple(stride))
    wp = _cached(
        w,
        key,
        lambda: torch.ops.onednn.qconv_prepack(
            w.contiguous(), _ones(n), 1.0, 128, list(stride), [0, 0], [1, 1], 1, None
        ),
    )
    one, zero = _unit(n)
    return torch.ops.onednn.qconv2d_pointwise(
        xu,
        1.0,
        128,
        wp,
        one,
        zero,
        None,
        list(stride),
        [0, 0],
        [1, 1],
        1,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def requant(
    acc: Tensor,
    bias: Tensor | None,
    rq: Any,
    lut: Tensor | None = None,
    residual: Tensor | None = None,
    limit: int = 0,
    relu: bool = False,
    split: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Fused ``lut?[requant(acc + bias)]`` (+ residual, clamped to ``+-limit``, or to
    ``[0, limit]`` with ``relu``) over the last dim; ``rq`` a
    :class:`~hawq.integer.dyadic.Requant` (fields () or (N,)). Output dtype: int32 with a
    residual, else the table's dtype with ``lut``, else ``rq.out_dtype``.
    ``split=(B, T, H, hd)``: ``acc`` is (B T, 3 H hd) and the output is written as
    (3, B, H, T, hd) (a qkv projection in the layout of the attention products)."""
    n = acc.shape[-1]
    c = rq.channels(n)
    out_dtype = rq.out_dtype if lut is None else lut.dtype
    out_dtype = torch.int32 if residual is not None else out_dtype
    b = None if bias is None else _cached(bias, ("b32",), lambda: bias.to(torch.int32))
    lut32 = None if lut is None else _cached(lut, ("lut",), lambda: lut.to(torch.int32))
    res = None if residual is None else residual.to(torch.int32)
    lo = 0 if relu else -int(limit)
    return ext().requant(
        acc, b, c.m, c.e, c.z, c.lo, c.hi, lut32, res, lo, int(limit), out_dtype, list(split or ())
    )


def scalar_fields(rq: Any) -> list[int]:
    """A per-tensor requantizer as the five ints the C++ kernels take: m, e, z, lo, hi."""
    return [int(t) for t in (rq.m, rq.e, rq.z, rq.lo, rq.hi)]


def softmax(
    q: Tensor,
    shift: int,
    q_ln2: int,
    table: Tensor,
    out_bits: int,
    rq: Any = None,
    sub: int | None = None,
) -> Tensor:
    """:class:`~hawq.integer.softmax.IntSoftmax` rows, then the scalar ``rq`` if given.
    With ``sub`` the output is float32 ``codes - sub`` (exact: the zero-point-corrected
    operand of the next product)."""
    fields = [] if rq is None else scalar_fields(rq)
    dt = torch.int64 if rq is None else rq.out_dtype
    dt = dt if sub is None else torch.float32
    t32 = _cached(table, ("t32",), lambda: table.to(torch.int32))  # T[r] <= 2^30
    return ext().softmax(q, shift, q_ln2, t32, out_bits, fields, dt, int(sub or 0))


def attention(
    h: Tensor,
    w: Tensor,
    bias: Tensor,
    qkv_rq: Any,
    heads: int,
    zq: int,
    zk: int,
    zv: int,
    zp: int,
    softmax_mod: Any,
    p_rq: Any,
    out_rq: Any,
) -> Tensor:
    """:func:`hawq.integer.ops.int_attention` on the CPU, after the qkv GEMM + requant:

    * with AVX-512 VNNI (and per-tensor ``p_rq``/``out_rq``): one fused C++ kernel per
      (image, head) -- both products as u8 x s8 VNNI dot products with the zero points
      corrected by row and column sums, softmax and both requantizations in between, the
      output written straight into (B, T, D);
    * otherwise the qkv epilogue writes ``code - z`` (a requant with ``z = 0`` and
      ``[lo - z, hi - z]``: the same integers) as float32 in the (3, B, H, T, hd) layout the
      products read; the products are float32 GEMMs (exact: integer partial sums below
      ``2^24`` while K <= 258); softmax hands on ``p - z_p`` as float32.
    """
    b, t, _ = h.shape
    acc = gemm(h.reshape(b * t, -1), w)
    n = acc.shape[-1]
    hd = n // (3 * heads)
    sm = softmax_mod
    scalar = p_rq.m.dim() == 0 and out_rq.m.dim() == 0
    if scalar and hasattr(ext(), "attention_int8"):
        qkv = requant(acc, bias, qkv_rq).reshape(b, t, 3, heads, hd)
        t32 = _cached(sm.exp_table, ("t32",), lambda: sm.exp_table.to(torch.int32))
        return ext().attention_int8(
            qkv,
            zq,
            zk,
            zv,
            zp,
            sm.shift,
            sm.q_ln2_int,
            t32,
            sm.out_bits,
            scalar_fields(p_rq),
            scalar_fields(out_rq),
        )
    q, k, v = requant(acc, bias, _centred(qkv_rq, n), split=(b, t, heads, hd))
    p = softmax(
        torch.matmul(q, k.transpose(-2, -1)),
        sm.shift,
        sm.q_ln2_int,
        sm.exp_table,
        sm.out_bits,
        p_rq,
        sub=zp,
    )
    out = requant(torch.matmul(p, v), None, out_rq)  # (B, H, T, hd) int8
    return out.transpose(1, 2).reshape(b, t, -1)


def _centred(rq: Any, n: int) -> Any:
    """``rq`` giving ``code - z`` as float32: z = 0, bounds ``lo - z``, ``hi - z`` (cached)."""
    from hawq.integer.dyadic import Requant

    c = rq.channels(n)
    key = (id(rq), n)
    got = _centred_cache.get(key)
    if got is None or got[0] is not rq:
        got = (rq, Requant(c.m, c.e, torch.zeros_like(c.z), c.lo - c.z, c.hi - c.z, torch.float32))
        _centred_cache[key] = got
    return got[1]


_centred_cache: dict[tuple, tuple] = {}
