"""Traces of every diagonal block at once, from one full product per sample.

Hutchinson: for Rademacher :math:`v` (entries :math:`\\pm 1`) split into blocks
:math:`v = (v_1, \\dots, v_L)`,

.. math::  \\mathbb E\\,[v_l^\\top (A v)_l]
           = \\sum_m \\mathbb E\\,[v_l^\\top A_{lm} v_m] = \\mathrm{tr}(A_{ll}),

because :math:`\\mathbb E[v_l v_m^\\top] = \\delta_{lm} I`. So ONE product
:math:`Av` per sample gives an unbiased estimate of every block's trace, and
their sum :math:`v^\\top A v` estimates :math:`\\mathrm{tr}(A)`. (Off-diagonal
blocks add variance but no bias.) Running means and standard errors
:math:`s/\\sqrt n` are kept per block; sampling stops when every block's
relative standard error is at most ``rtol`` (after ``min_samples``) or at
``max_samples``.

Hutch++ (Meyer et al. 2021), per block: with a sketch :math:`Q = \\mathrm{orth}(AS)`
(:math:`S` Rademacher, ``sketch`` columns) and :math:`C = Q^\\top A Q`,
:math:`A = QCQ^\\top + R`. The block traces of :math:`QCQ^\\top` are exact,
:math:`\\mathrm{tr}_l(QCQ^\\top) = \\sum_{i \\in l} (Q_l C Q_l^\\top)_{ii}`, and those of
:math:`R` are estimated as above with :math:`R v = Av - QC(Q^\\top v)`, which has
far less variance when a few directions dominate. The sketch costs
``2 * sketch`` products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

ESTIMATORS = ("hutchinson", "hutchpp")


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: mean, its standard error, samples used, block size."""

    mean: float
    stderr: float
    n_samples: int
    numel: int

    @property
    def rel_stderr(self) -> float:
        """:math:`s_{\\bar x} / |\\bar x|` (0 when both are 0, inf when only the mean is)."""
        if self.stderr == 0.0:
            return 0.0
        return self.stderr / abs(self.mean) if self.mean != 0.0 else float("inf")


class RunningStats:
    """Welford running mean and variance of a vector of quantities (float64)."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def stderr(self) -> torch.Tensor:
        """:math:`\\sqrt{s^2 / n}` with the unbiased sample variance (inf below 2 samples)."""
        if self.n < 2:
            return torch.full_like(self.mean, float("inf"))
        return (self.m2.clamp_min(0) / (self.n - 1) / self.n).sqrt()

    def rel_stderr(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Per entry :math:`s_{\\bar x}/|\\bar x + c|` for a known offset :math:`c`;
        0 where the standard error vanishes (an exactly zero block)."""
        se = self.stderr
        mean = self.mean if offset is None else self.mean + offset
        rel = se / mean.abs()
        return torch.where((se == 0), torch.zeros_like(rel), rel)


@dataclass
class BlockTraces:
    """Result of :func:`block_traces`.

    Attributes:
        blocks: name -> estimate of :math:`\\mathrm{tr}(A_{ll})`.
        total: estimate of :math:`\\mathrm{tr}(A)` from the same samples (sum of blocks).
        n_products: operator products used (samples, plus the Hutch++ sketch).
        estimator: ``hutchinson`` or ``hutchpp``.
    """

    blocks: dict[str, TraceEstimate]
    total: TraceEstimate
    n_products: int
    estimator: str


def rademacher(n: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``n`` independent :math:`\\pm 1` entries drawn on the CPU from ``gen``."""
    v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
    return (2 * v - 1).to(dtype=dtype, device=device)


def _sketch(op: Any, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q = orth(A S)`` (n, m) and ``C = Q^T A Q`` (m, m), with ``2m`` products."""
    n = op.shape[0]
    s = torch.stack([rademacher(n, gen, op.dtype, op.device) for _ in range(m)], dim=1)
    q, _ = torch.linalg.qr(op @ s)
    c = q.T @ (op @ q)
    return q, 0.5 * (c + c.T)


def block_traces(
    op: Any,
    blocks: Mapping[str, slice] | None = None,
    rtol: float = 0.05,
    max_samples: int = 500,
    min_samples: int = 10,
    seed: int = 0,
    estimator: str = "hutchinson",
    sketch: int = 10,
    callback: Callable[[int, float], None] | None = None,
) -> BlockTraces:
    """Estimate every block trace of symmetric ``op`` with one product per sample.

    Args:
        op: operator with ``@``, ``shape``, ``dtype``, ``device`` (and ``blocks`` by default).
        blocks: name -> slice of the flat vector (default ``op.blocks``).
        rtol: stop when every block's relative standard error is at most this.
        max_samples: samples at most.
        min_samples: samples at least (standard errors of fewer are unreliable).
        seed: seeds the Rademacher vectors.
        estimator: ``hutchinson`` or ``hutchpp``.
        sketch: Hutch++ sketch columns (``2 * sketch`` extra products).
        callback: ``callback(samples, worst_rel_stderr)`` after every sample.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    blocks = dict(op.blocks if blocks is None else blocks)
    names = list(blocks)
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    exact = torch.zeros(len(names), dtype=torch.float64)
    products = 0
    q = c = None
    if estimator == "hutchpp":
        m = min(sketch, n)
        q, c = _sketch(op, m, gen)
        products = 2 * m
        qc = q @ c  # (n, m)
        exact = torch.stack([(qc[blocks[k]] * q[blocks[k]]).sum().double().cpu() for k in names])
    stats, total = RunningStats(len(names)), RunningStats(1)
    for _ in range(max_samples):
        v = rademacher(n, gen, op.dtype, op.device)
        av = op @ v
        products += 1
        if q is not None:
            av = av - q @ (c @ (q.T @ v))
        prod = v * av
        stats.add(torch.stack([prod[blocks[k]].sum() for k in names]))
        total.add(prod.sum().reshape(1))
        worst = float(stats.rel_stderr(offset=exact).max()) if stats.n >= 2 else math.inf
        if callback is not None:
            callback(stats.n, worst)
        if stats.n >= max(min_samples, 2) and worst <= rtol:
            break
    mean, se = stats.mean + exact, stats.stderr
    est = {k: TraceEstimate(float(mean[i]), float(se[i]), stats.n, blocks[k].stop - blocks[k].start)
           for i, k in enumerate(names)}  # fmt: skip
    t_mean = float(total.mean[0]) + (float(c.trace()) if c is not None else 0.0)
    whole = TraceEstimate(t_mean, float(total.stderr[0]), total.n, n)
    return BlockTraces(est, whole, products, estimator)
