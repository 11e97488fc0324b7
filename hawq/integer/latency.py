"""A measured latency table: each quantizable op's time at each candidate setting.

The allocator's latency budget (``alloc.latency_us``) is ``sum_i T_i(setting_i)``, with
``T_i`` in microseconds per image read from a :class:`~hawq.alloc.costs.LatencyTable`.
:func:`measure_latency` fills that table on the machine it runs on by timing the kernel
the integer model would run for the op (:mod:`hawq.integer.ops`, so the backend is the one
selected there: on a CPU ``auto`` is the ``cpu`` backend -- oneDNN INT8 GEMMs/convs with the
fused C++ epilogue -- whenever it builds and measures faster than the reference, so the table
times the real kernels, not the float64 reference; Triton on CUDA):

* integer weights of <= 4 bits: packed int4 weights (two per byte, unpacked in the kernel),
  int8 activations; 5-8 bit weights: int8 x int8. Activations below 8 bits still run as
  int8 (no GPU has INT4 x INT4 tensor cores that torch reaches; Hopper has none at all);
* a matmul (``a @ b`` of two activations): :func:`~hawq.integer.ops.int_matmul` on int8 codes
  with nonzero zero points, as attention's softmax output has;
* an operand left in floating point: the float op in fp16 on CUDA, fp32 on a CPU;
* every integer kernel includes its requantization epilogue (int8 output), as deployed.

The operand shapes are those of the model's own ops (recorded by one probe forward pass),
scaled to ``batch`` images; a timing is the median over ``iters`` calls after ``warmup``
(CUDA events on a GPU), divided by ``batch``. Ops with equal GEMM shape keys
(:func:`~hawq.alloc.costs.gemm_shape`) are timed once. The JSON written by
:func:`write_latency_table` is what ``alloc.latency_table`` reads::

    {"unit": "us", "per": "image", "batch": 1024, "device": "NVIDIA H100 ...",
     "by_shape": {"linear:65x512x1536": {"w4a4": 1.9, "w8a8": 2.1, ...}, ...},
     "ops": {"blocks.0.attn.qkv": "linear:65x512x1536", ...}}
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hawq.alloc.candidates import Candidate, op_candidates
from hawq.alloc.costs import gemm_shape
from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.dyadic import Requant
from hawq.io import write_json
from hawq.models.ops import op_kind, probe_ops

Tensor = torch.Tensor
REQUANT_SCALE = 1e-3  # any scale: the epilogue's cost does not depend on its value


@dataclass(frozen=True)
class OpShape:
    """What one op multiplies for one image (shapes without the batch dimension)."""

    kind: str  # linear | conv2d | matmul
    key: str  # gemm_shape key
    a: tuple[int, ...]  # input (linear/conv2d) or left operand (matmul)
    b: tuple[int, ...]  # weight (N, K) / (N, C, kh, kw), or right operand (matmul)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)


def op_shapes(model: nn.Module, input_size: Sequence[int]) -> dict[str, OpShape]:
    """Op name -> :class:`OpShape`, from one probe forward pass (first call of each op)."""
    out: dict[str, OpShape] = {}

    def record(name: str, m: nn.Module, inputs: tuple, output: Tensor) -> None:
        if name in out:
            return
        kind = op_kind(m)
        key = gemm_shape(m, kind, inputs, output)
        if kind == "matmul":
            out[name] = OpShape(kind, key, tuple(inputs[0].shape[1:]), tuple(inputs[1].shape[1:]))
        else:
            conv = kind == "conv2d"
            out[name] = OpShape(
                kind,
                key,
                tuple(inputs[0].shape[1:]),
                tuple(m.weight.shape),
                tuple(m.stride) if conv else (1, 1),
                tuple(m.padding) if conv else (0, 0),
            )

    probe_ops(model, record, tuple(input_size), batch=1)
    return out


def median_seconds(fn: Callable[[], Any], iters: int, warmup: int, cuda: bool = False) -> float:
    """Median wall time of ``fn()``: CUDA events with ``cuda`` (the work is queued on the
    GPU), else ``perf_counter``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _float_kernel(op: OpShape, batch: int, device: torch.device) -> Callable[[], Tensor]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(batch, *op.a, device=device, dtype=dtype)
    b = torch.randn(*((batch,) if op.kind == "matmul" else ()), *op.b, device=device, dtype=dtype)
    if op.kind == "linear":
        return lambda: F.linear(a, b)
    if op.kind == "conv2d":
        return lambda: F.conv2d(a, b, None, op.stride, op.padding)
    return lambda: torch.matmul(a, b)


def _int_kernel(op: OpShape, c: Candidate, batch: int, device: torch.device) -> Callable:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def codes(shape: Sequence[int], lo: int = -128, hi: int = 128) -> Tensor:
        return torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch.int8).to(device)

    a = codes((batch, *op.a))
    if op.kind == "matmul":  # unsigned softmax-like codes stored with zero point -128
        b = codes((batch, *op.b))
        rq = Requant.from_scale(REQUANT_SCALE).to(device)
        return lambda: ops.int_matmul(a, b, -128, 3, rq)
    n = op.b[0]
    k = int(torch.tensor(op.b[1:]).prod())
    int4 = c.w_bits <= 4
    w = codes((n, k), -8, 8) if int4 else codes((n, k))
    w = ops.pack_int4(w) if int4 else w
    bias = torch.randint(-1000, 1000, (n,), generator=gen, dtype=torch.int32).to(device)
    rq = Requant.from_scale(torch.full((n,), REQUANT_SCALE, dtype=torch.float64)).to(device)
    if op.kind == "linear":
        return lambda: ops.int_linear(a, w, bias, rq, k=k)
    pad = op.padding[0]

    w8 = ops.weight_int8(w, k).reshape(op.b)  # as IntConv2d: unpacked once, then the kernel

    def conv() -> Tensor:
        return ops.int_conv2d(a, w8, bias, rq, op.stride, pad, 0)

    return conv


def kernel(op: OpShape, c: Candidate, batch: int, device: torch.device) -> Callable[[], Tensor]:
    """A zero-argument call running the deployed kernel of ``op`` at setting ``c``."""
    float_op = c.a_bits is None or (op.kind != "matmul" and c.w_bits is None)
    if float_op:
        return _float_kernel(op, batch, device)
    formats = {c.a_format} if op.kind == "matmul" else {c.w_format, c.a_format}
    if formats != {"int"}:
        raise HawqError(
            f"no latency kernel for setting {c.key} of {op.key}: integer grids "
            "only (float formats run as fake quantization)"
        )
    if op.kind == "conv2d" and op.padding[0] != op.padding[1]:
        raise HawqError(f"{op.key}: asymmetric padding {op.padding} has no integer kernel")
    return _int_kernel(op, c, batch, device)


def measure_latency(
    model: nn.Module,
    candidates: Sequence[Candidate],
    input_size: Sequence[int] = (3, 32, 32),
    batch: int = 256,
    iters: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every distinct op shape of ``model`` at every candidate (see the module docstring).

    Args:
        model: the FP model (only its op shapes matter).
        candidates: the allocator's candidate settings (matmul ops get their own forms).
        input_size: one input's shape.
        batch: images per timed call.
        iters / warmup: timed and untimed calls per (shape, setting).
        device: where the kernels run.
        progress: called with each shape key before it is timed.

    Returns:
        A :class:`~hawq.alloc.costs.LatencyTable` JSON dict (microseconds per image).
    """
    if batch < 1 or iters < 1 or warmup < 0:
        raise HawqError(f"latency: batch={batch}, iters={iters} must be >= 1, warmup >= 0")
    device = torch.device(device)
    shapes = op_shapes(model, input_size)
    by_shape: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for op in shapes.values():
            if op.key in by_shape:
                continue
            if progress is not None:
                progress(op.key)
            row = {}
            for c in op_candidates(op.kind, list(candidates)):
                fn = kernel(op, c, batch, device)
                sec = median_seconds(fn, iters, warmup, device.type == "cuda")
                row[c.key] = sec * 1e6 / batch
            by_shape[op.key] = row
    kernels = ops.kernel_report(device)  # the backend that ran, the CPU, its ISA, the GEMM
    return {
        "unit": "us",
        "per": "image",
        "batch": batch,
        "iters": iters,
        "device": _device_name(device),
        "backend": kernels["resolved"],
        "kernels": kernels,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "by_shape": by_shape,
        "ops": {n: s.key for n, s in shapes.items()},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_latency_table(table: dict[str, Any], path: str | Path) -> Path:
    """Write ``table`` as JSON (atomically); ``alloc.latency_table=<path>`` reads it."""
    return write_json(Path(path), table)
