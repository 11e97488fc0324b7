"""``integer`` config group: conversion to the integer-only graph and its export."""

from __future__ import annotations

from dataclasses import dataclass

from hawq.integer.ops import BACKENDS
from hawq.schema import require


@dataclass
class IntegerConfig:
    """Options of the ``integer`` and ``export`` stages (see conf/integer/default.yaml)."""

    source: str | None = None  # quantized checkpoint; None: qat_model.pt, else ptq_model.pt
    residual_bits: int = 16  # fixed-point bits of the residual stream (int32 storage)
    pack_int4: bool = True  # <= 4-bit weights stored two per byte
    calib_batches: int = 4  # batches that size the residual / GELU / logit formats
    calib_batch_size: int = 256
    margin: float = 1.25  # widening of those calibrated ranges
    backend: str = "auto"  # integer kernels: auto | reference | int_mm | triton
    onnx: bool = False  # stage export also writes export/model.onnx (QDQ) of the source model
    float_islands: bool = False  # ops with no integer form stay float (reported) instead of failing

    def __post_init__(self) -> None:
        require(8 <= self.residual_bits <= 24, "residual_bits", self.residual_bits, "8-24")
        require(self.calib_batches >= 1, "calib_batches", self.calib_batches, "an integer >= 1")
        require(
            self.calib_batch_size >= 1, "calib_batch_size", self.calib_batch_size, "an integer >= 1"
        )
        require(self.margin >= 1.0, "margin", self.margin, ">= 1.0")
        require(self.backend in BACKENDS, "backend", self.backend, ", ".join(BACKENDS))


@dataclass
class LatencyConfig:
    """Options of the ``latency`` stage (see conf/latency/default.yaml)."""

    batch: int = 256  # images per timed call
    iters: int = 20  # timed calls per (shape, setting); median kept
    warmup: int = 3
    out: str = "latency.json"

    def __post_init__(self) -> None:
        require(self.batch >= 1, "batch", self.batch, "an integer >= 1")
        require(self.iters >= 1, "iters", self.iters, "an integer >= 1")
        require(self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
