"""Stage ``latency``: time every op shape of the model at every allocation candidate.

Input: the FP checkpoint, else the model config (only op shapes matter), ``alloc``'s
candidates and pins, ``integer.backend``. Output: ``latency.json``
(:mod:`hawq.integer.latency`; microseconds per image, keyed by GEMM shape and listing op
name -> shape) and ``latency.png`` (per op, each setting's time). The ``alloc`` stage reads
the table for an ``alloc.latency_us`` budget when ``alloc.latency_table`` is not set.
Measure on the hardware you deploy to: a CPU table times the reference kernels.
"""

from __future__ import annotations

import logging
from typing import Any

from hawq.alloc.allocate import resolve_pins
from hawq.alloc.candidates import parse_candidates
from hawq.integer import ops
from hawq.integer.config import LatencyConfig
from hawq.integer.latency import measure_latency, write_latency_table
from hawq.models.ops import quantizable_ops
from hawq.stages.context import Context
from hawq.stages.contract import Contract, checkpoint, latency_out
from hawq.viz.alloc import plot_latency

log = logging.getLogger("hawq")


def _config(ctx: Context) -> LatencyConfig:
    return ctx.group("latency")


CONTRACT = Contract(
    (
        "model",
        "latency",
        "alloc.candidates",
        "alloc.pins",
        "alloc.pin_first",
        "alloc.pin_last",
        "integer.backend",
    ),
    (checkpoint,),
    machine=True,
)


def run(ctx: Context) -> dict[str, Any]:
    cfg = _config(ctx)
    ac = ctx.group("alloc")
    ops.set_backend(ctx.group("integer").backend)
    # the model that will be quantized: the FP checkpoint when it exists, else the config's
    model = ctx.load_fp_model() if ctx.checkpoint.is_file() else ctx.build_model().eval()
    names = list(quantizable_ops(model))
    pins = resolve_pins(names, ac.pins, ac.pin_first, ac.pin_last)
    cands = parse_candidates([*ac.candidates, *pins.values()])
    table = measure_latency(
        model,
        cands,
        tuple(ctx.data.input_size),
        cfg.batch,
        cfg.iters,
        cfg.warmup,
        ctx.device,
        progress=lambda key: log.info("latency: timing %s", key),
    )
    out = write_latency_table(table, latency_out(ctx))
    plot_latency(table, ctx.path(out.stem + ".png"))
    per_setting = {c.key: 0.0 for c in cands}
    for shape in table["ops"].values():
        for key, us in table["by_shape"][shape].items():
            if key in per_setting:
                per_setting[key] += us
    log.info(
        "latency: %d ops, %d shapes on %s -> %s",
        len(table["ops"]),
        len(table["by_shape"]),
        table["device"],
        out,
    )
    return {
        "table": str(out),
        "device": table["device"],
        "backend": table["backend"],
        "batch": cfg.batch,
        "shapes": len(table["by_shape"]),
        "total_us_per_image": per_setting,
    }
