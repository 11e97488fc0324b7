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

.. math::  \\sqrt{\\sum_l s_l^2} \\big/ \\sum_l |\\hat t_l| \\approx \\text{rtol}

(or ``max_samples``). Unlike "every block to rtol", it ends when one block's trace is
near zero (that block would need millions of samples). Deciding the stop on the very
samples that form the estimate biases it (runs stop early when :math:`\\sum_l|\\hat t_l|`
erred upward: +5% with two blocks at rtol 0.2), so the probes are cross-fitted
(:mod:`hawq.hessian.sampling`): two independent streams, each stopped by its own rule,
each averaged over the length the OTHER stream chose, :math:`\\hat t = \\frac12(\\bar x_A(\\tau_B)
+ \\bar x_B(\\tau_A))`, which is exactly unbiased. Per-block standard errors are reported
as they are; a block whose sign is undetermined (:math:`|\\hat t_l| < 2 s_l`) is the
allocator's to treat (:mod:`hawq.alloc.sensitivity`).

Memory: the sketches keep :math:`Q` and :math:`Y` (n, m) on the operator's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hawq.hessian.sampling import RunningStats, aggregate_rel_stderr, cross_fit

__all__ = [
    "ESTIMATORS",
    "BlockTraces",
    "RunningStats",
    "TraceEstimate",
    "aggregate_rel_stderr",
    "block_traces",
    "rademacher",
]
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


@dataclass
class BlockTraces:
    """Result of :func:`block_traces`.

    Attributes:
        blocks: name -> estimate of :math:`\\mathrm{tr}(A_{ll})`.
        total: estimate of :math:`\\mathrm{tr}(A)` from the same samples.
        n_products: operator products used (samples drawn, plus ``2 * sketch``; the
            estimates' ``n_samples`` may be fewer: :mod:`hawq.hessian.sampling`).
        estimator: ``sandwich``, ``hutchpp`` or ``hutchinson``.
        sketch: sketch columns used (0 for ``hutchinson``).
        rel_stderr: the aggregate relative standard error of the estimate (about rtol).
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
    return _block_cols(x[:, None], ids, n_blocks)[0]


def _block_cols(x: torch.Tensor, ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Per-block sums of every column of ``x`` (n, k) -> (k, n_blocks), float64 on the CPU."""
    out = torch.zeros(n_blocks + 1, x.shape[1], dtype=torch.float64, device=x.device)
    out.index_add_(0, ids, x.double())
    return out[:n_blocks].T.cpu()


@dataclass
class _Sketched:
    """The sketch's exact part: ``q`` (n, m) and ``c`` (m, m) (``None`` for Hutchinson),
    the exact per-block traces and whole trace, and ``m``."""

    q: torch.Tensor | None
    c: torch.Tensor | None
    exact: torch.Tensor
    exact_total: float
    m: int


def _exact_part(
    op: Any, estimator: str, sketch: int, ids: torch.Tensor, nb: int, gen: torch.Generator
) -> _Sketched:
    """The sketch (``2m`` products) and the block traces it gives exactly: of
    :math:`QCQ^\\top` (``hutchpp``) and also of :math:`QZ^\\top + ZQ^\\top` (``sandwich``)."""
    if estimator == "hutchinson":
        return _Sketched(None, None, torch.zeros(nb, dtype=torch.float64), 0.0, 0)
    m = min(sketch, op.shape[0])
    q, y = _sketch(op, m, gen)
    c = q.T @ y
    c = 0.5 * (c + c.T)  # (m, m)
    exact = _block_sum(q @ c * q, ids, nb)  # diag of Q C Q^T, per block
    if estimator == "sandwich":
        exact += 2 * _block_sum(q * (y - q @ c), ids, nb)  # diag of QZ^T + ZQ^T
    return _Sketched(q, c, exact, float(c.trace()), m)


def _residual_product(op: Any, v: torch.Tensor, estimator: str, sk: _Sketched) -> torch.Tensor:
    """The sampled operator times ``v`` (n, k): :math:`(I-P)A(I-P)v` (``sandwich``),
    :math:`(A - QCQ^\\top)v` (``hutchpp``) or :math:`Av`."""
    q, c = sk.q, sk.c
    if estimator == "sandwich":
        av = op @ (v - q @ (q.T @ v))
        return av - q @ (q.T @ av)
    if estimator == "hutchpp":
        return op @ v - q @ (c @ (q.T @ v))
    return op @ v


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

    Per probe :math:`v` the row :math:`(v_l^\\top (Rv)_l)_l` plus :math:`v^\\top Rv` (the
    whole trace) for the sampled operator :math:`R`; the rows are cross-fitted
    (:func:`hawq.hessian.sampling.cross_fit`): :math:`\\hat t = \\text{exact} + \\frac12
    (\\bar x_A(\\tau_B) + \\bar x_B(\\tau_A))`, unbiased for every stop.

    Args:
        op: operator with ``@``, ``shape``, ``dtype``, ``device`` (and ``blocks`` by default).
        blocks: name -> slice of the flat vector (default ``op.blocks``); need not cover it.
        rtol: target aggregate relative standard error (module docstring) of the estimate.
        max_samples: samples at most (after the sketch): the product budget is
            ``2 * sketch + max_samples``, so every run ends.
        min_samples: samples at least in the estimate (standard errors of fewer are
            unreliable); ``max_samples <= max(min_samples, 3)`` is a fixed count.
        seed: seeds the sketch and the Rademacher vectors.
        estimator: ``sandwich`` (default), ``hutchpp`` or ``hutchinson``.
        sketch: sketch columns (``2 * sketch`` products; capped at the dimension).
        callback: ``callback(samples drawn, aggregate_rel_stderr of them all)`` after every
            sample (progress; the stop is decided per stream).
        chunk: probe vectors multiplied together (``op @ V`` with ``V`` of ``chunk``
            columns: one vmapped double backward on a :class:`HessianOperator`); the stop
            rules are checked every ``2 * ceil(chunk / 2)`` probes. The vectors, hence the
            estimates for a given number of samples, do not depend on it.
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
    sk = _exact_part(op, estimator, sketch, ids, nb, gen)

    def draw(k: int) -> torch.Tensor:  # (k, nb + 1): block rows, then the whole trace
        v = torch.stack([rademacher(n, gen, op.dtype, op.device) for _ in range(k)], dim=1)
        prod = v * _residual_product(op, v, estimator, sk)
        return torch.cat([_block_cols(prod, ids, nb), prod.sum(0).double().cpu()[:, None]], 1)

    def statistic(mean: torch.Tensor, se: torch.Tensor) -> float:
        return aggregate_rel_stderr(mean[:nb] + sk.exact, se[:nb])

    res = cross_fit(draw, nb + 1, statistic, rtol, min_samples, max_samples, chunk, callback)
    mean, se = res.mean[:nb] + sk.exact, res.stderr
    est = {
        k: TraceEstimate(float(mean[i]), float(se[i]), res.n, blocks[k].stop - blocks[k].start)
        for i, k in enumerate(names)
    }
    whole = TraceEstimate(float(res.mean[nb]) + sk.exact_total, float(se[nb]), res.n, n)
    return BlockTraces(
        est, whole, 2 * sk.m + res.drawn, estimator, sk.m, statistic(res.mean, res.stderr)
    )
