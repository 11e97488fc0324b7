"""Traces of every diagonal block at once: Hutchinson, Hutch++ and the sandwich estimator.

Hutchinson: for Rademacher :math:`v` (entries :math:`\\pm 1`) split into blocks
:math:`v = (v_1, \\dots, v_L)`,

.. math::  \\mathbb E\\,[v_l^\\top (A v)_l]
           = \\sum_m \\mathbb E\\,[v_l^\\top A_{lm} v_m] = \\mathrm{tr}(A_{ll}),

because :math:`\\mathbb E[v_l v_m^\\top] = \\delta_{lm} I`. So ONE product
:math:`Av` per sample gives an unbiased estimate of every block's trace (the
off-diagonal blocks add variance, :math:`2\\lVert A_{ll}\\rVert_F^2 - 2\\sum_i A_{ii}^2
+ \\sum_{m\\ne l}\\lVert A_{lm}\\rVert_F^2`, but no bias).

Sketches (``sketch`` = :math:`m` columns, :math:`2m` products): :math:`Q = \\mathrm{orth}(AS)`
for Rademacher :math:`S` (n, m), :math:`P = QQ^\\top`, :math:`Y = AQ`,
:math:`C = Q^\\top Y`, :math:`Z = (I - P) A Q = Y - QC`. Then

.. math::  A = PAP + PA(I-P) + (I-P)AP + (I-P)A(I-P) = QCQ^\\top + QZ^\\top + ZQ^\\top + R.

* ``hutchpp`` (Meyer et al. 2021, per block): :math:`\\mathrm{tr}_l(QCQ^\\top)
  = \\sum_{i\\in l}(QC)_i\\cdot Q_i` exactly; Hutchinson on everything else,
  :math:`(A - QCQ^\\top)v`.
* ``sandwich`` (the default): the two cross terms are exact too,
  :math:`\\mathrm{tr}_l(QZ^\\top + ZQ^\\top) = 2\\sum_{i\\in l} Q_i\\cdot Z_i` (their whole
  trace is 0, but not their block traces), and Hutchinson runs only on
  :math:`R = (I-P)A(I-P)`: :math:`v_l^\\top (R v)_l` with :math:`Rv = (I-P)A(I-P)v`. The
  dominant directions of :math:`A` leave :math:`R` from BOTH sides, so the
  per-block variance falls far below Hutch++'s at the same number of products.

Given the sketch the exact parts are constants and the sampled part is unbiased
for the rest, so every block estimate is unbiased, and its standard error (the
sample standard error of the sampled part) is the honest conditional one.

Stop rule: sample until the *aggregate* relative standard error

.. math::  \\sqrt{\\textstyle\\sum_l s_l^2} \\big/ \\textstyle\\sum_l |\\hat t_l| \\le \\text{rtol}

(after ``min_samples``) or ``max_samples``. Unlike "every block to rtol", it
ends when one block's trace is near zero (that block would need millions of
samples) and it barely depends on any single estimate, so it does not bias
small traces upward. Per-block standard errors are reported as they are; a
block whose sign is undetermined (:math:`|\\hat t_l| < 2 s_l`) is the allocator's
to treat (:mod:`hawq.alloc.sensitivity`).

Memory: the sketches keep :math:`Q` and :math:`Y` (n, m) on the operator's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

ESTIMATORS = ("sandwich", "hutchpp", "hutchinson")


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: mean, its standard error, samples used, block size."""

    mean: float
    stderr: float
    n_samples: int
    numel: int

    @property
    def sign_undetermined(self) -> bool:
        """:math:`|\\bar x| < 2 s_{\\bar x}`: the sign of the trace is not resolved."""
        return abs(self.mean) < 2 * self.stderr

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


def aggregate_rel_stderr(mean: torch.Tensor, stderr: torch.Tensor) -> float:
    """The stop statistic :math:`\\sqrt{\\sum_l s_l^2} / \\sum_l |\\hat t_l|` (0 when all
    standard errors vanish, inf when only the traces do)."""
    se = float(stderr.double().pow(2).sum().sqrt())
    if se == 0.0:
        return 0.0
    tot = float(mean.double().abs().sum())
    return se / tot if tot > 0 else math.inf


@dataclass
class BlockTraces:
    """Result of :func:`block_traces`.

    Attributes:
        blocks: name -> estimate of :math:`\\mathrm{tr}(A_{ll})`.
        total: estimate of :math:`\\mathrm{tr}(A)` from the same samples.
        n_products: operator products used (samples, plus ``2 * sketch``).
        estimator: ``sandwich``, ``hutchpp`` or ``hutchinson``.
        sketch: sketch columns used (0 for ``hutchinson``).
        rel_stderr: the aggregate relative standard error at the stop.
    """

    blocks: dict[str, TraceEstimate]
    total: TraceEstimate
    n_products: int
    estimator: str
    sketch: int = 0
    rel_stderr: float = math.inf


def rademacher(n: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``n`` independent :math:`\\pm 1` entries drawn on the CPU from ``gen``."""
    v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
    return (2 * v - 1).to(dtype=dtype, device=device)


def _sketch(op: Any, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q = orth(A S)`` (n, m) and ``Y = A Q`` (n, m), with ``2m`` products."""
    n = op.shape[0]
    s = torch.stack([rademacher(n, gen, op.dtype, op.device) for _ in range(m)], dim=1)
    q, _ = torch.linalg.qr(op @ s)
    return q, op @ q


def _block_sum(x: torch.Tensor, ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Per-block sums of ``x`` (n,) or rows of ``x`` (n, k) -> (n_blocks,), float64 on the CPU;
    entries with id ``n_blocks`` (in no block) are dropped."""
    if x.ndim == 2:
        x = x.sum(dim=1)
    out = torch.zeros(n_blocks + 1, dtype=torch.float64, device=x.device)
    out.index_add_(0, ids, x.double())
    return out[:n_blocks].cpu()


def block_traces(
    op: Any,
    blocks: Mapping[str, slice] | None = None,
    rtol: float = 0.01,
    max_samples: int = 500,
    min_samples: int = 10,
    seed: int = 0,
    estimator: str = "sandwich",
    sketch: int = 40,
    callback: Callable[[int, float], None] | None = None,
    chunk: int = 1,
) -> BlockTraces:
    """Estimate every block trace of symmetric ``op`` with one product per sample.

    Args:
        op: operator with ``@``, ``shape``, ``dtype``, ``device`` (and ``blocks`` by default).
        blocks: name -> slice of the flat vector (default ``op.blocks``); need not cover it.
        rtol: stop when the aggregate relative standard error (module docstring) is at most this.
        max_samples: samples at most (after the sketch): the product budget is
            ``2 * sketch + max_samples``, so every run ends.
        min_samples: samples at least (standard errors of fewer are unreliable).
        seed: seeds the sketch and the Rademacher vectors.
        estimator: ``sandwich`` (default), ``hutchpp`` or ``hutchinson``.
        sketch: sketch columns (``2 * sketch`` products; capped at the dimension).
        callback: ``callback(samples, aggregate_rel_stderr)`` after every sample.
        chunk: probe vectors multiplied together (``op @ V`` with ``V`` of ``chunk``
            columns: one vmapped double backward on a :class:`HessianOperator`); the stop
            rule is checked after each chunk. The vectors, hence the estimates for a given
            number of samples, do not depend on it.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    blocks = dict(op.blocks if blocks is None else blocks)
    names = list(blocks)
    n, nb = op.shape[0], len(names)
    ids = torch.full((n,), nb, dtype=torch.long)
    for i, k in enumerate(names):
        ids[blocks[k]] = i
    ids = ids.to(op.device)
    gen = torch.Generator().manual_seed(seed)
    exact, exact_total = torch.zeros(nb, dtype=torch.float64), 0.0
    products, m, q, c = 0, 0, None, None
    if estimator != "hutchinson":
        m = min(sketch, n)
        q, y = _sketch(op, m, gen)
        products = 2 * m
        c = q.T @ y
        c = 0.5 * (c + c.T)  # (m, m)
        exact = _block_sum(q @ c * q, ids, nb)  # diag of Q C Q^T, per block
        exact_total = float(c.trace())
        if estimator == "sandwich":
            exact += 2 * _block_sum(q * (y - q @ c), ids, nb)  # diag of QZ^T + ZQ^T
        del y
    stats, total = RunningStats(nb), RunningStats(1)
    rel = math.inf
    while stats.n < max_samples:
        k = min(max(chunk, 1), max_samples - stats.n)
        v = torch.stack([rademacher(n, gen, op.dtype, op.device) for _ in range(k)], dim=1)
        if estimator == "sandwich":
            av = op @ (v - q @ (q.T @ v))
            av = av - q @ (q.T @ av)  # (I-P) A (I-P) v
        elif estimator == "hutchpp":
            av = op @ v - q @ (c @ (q.T @ v))  # (A - Q C Q^T) v
        else:
            av = op @ v
        products += k
        for prod in (v * av).unbind(1):  # (n,) per probe
            stats.add(_block_sum(prod, ids, nb))
            total.add(prod.sum().reshape(1))
            rel = (aggregate_rel_stderr(stats.mean + exact, stats.stderr) if stats.n >= 2
                   else math.inf)  # fmt: skip
            if callback is not None:
                callback(stats.n, rel)
        if stats.n >= max(min_samples, 2) and rel <= rtol:
            break
    mean, se = stats.mean + exact, stats.stderr
    est = {k: TraceEstimate(float(mean[i]), float(se[i]), stats.n, blocks[k].stop - blocks[k].start)
           for i, k in enumerate(names)}  # fmt: skip
    whole = TraceEstimate(float(total.mean[0]) + exact_total, float(total.stderr[0]), total.n, n)
    return BlockTraces(est, whole, products, estimator, m, rel)
