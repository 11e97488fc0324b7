"""Static activation ranges from calibration batches.

A calibrator sees batches through :meth:`Calibrator.observe` and returns a range
``(lo, hi)`` from :meth:`Calibrator.compute`; :func:`~hawq.quant.primitives.choose_qparams`
turns it into a scale and zero point.

* ``minmax``: ``[min x, max x]`` over all batches.
* ``ema_minmax``: ``m_t = (1 - c) m_{t-1} + c * min(x_t)`` (and max), ``c = 0.1``.
* ``percentile``: the ``p`` and ``1 - p`` quantiles (``|x|`` quantile for symmetric).
* ``mse``: the clipping ``alpha * [lo, hi]``, ``alpha`` on a grid in (0, 1], minimising
  ``sum (Q(x) - x)^2`` at the target bits.
* ``entropy``: TensorRT-style KL search: histogram ``|x|`` into 2048 bins, the zero bin
  set to its neighbour's count (exact zeros, e.g. half of a ReLU output, are kept exactly
  by any grid and would otherwise dominate ``P``); for each
  candidate threshold bin ``i`` let ``P`` = the first ``i`` bins with the tail folded into
  bin ``i``, ``Q`` = ``P`` merged into ``n_levels`` buckets and spread back over each
  bucket's non-empty bins; pick the ``i`` minimising ``KL(P || Q)``.

Percentile, MSE and entropy work on a sample of at most ``max_samples`` values
(every value while fewer were seen), drawn with a fixed seed.
"""

from __future__ import annotations

import numpy as np
import torch

from hawq.errors import HawqError
from hawq.quant.primitives import (
    choose_qparams,
    fake_quantize_grouped,
    qrange,
    reduce_range,
)

Tensor = torch.Tensor


class Calibrator:
    """Base: tracks the exact min/max and a bounded sample of the observed values.

    Args:
        bits: target bits (MSE and entropy depend on them).
        symmetric: the range will be used by a symmetric grid.
        max_samples: cap on the values kept for sample-based calibrators.
    """

    needs_sample = False

    def __init__(self, bits: int = 8, symmetric: bool = False, max_samples: int = 1 << 18) -> None:
        self.bits, self.symmetric, self.max_samples = bits, symmetric, max_samples
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.samples: list[Tensor] = []
        self.n_kept = 0
        self.n_batches = 0
        self._gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min().cpu(), x.max().cpu()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):  # NaN propagates into min/max
            raise HawqError(
                f"calibration input has NaN/Inf values (min {float(lo)}, max "
                f"{float(hi)}); calibration needs finite values"
            )
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.n_batches += 1
        if self.needs_sample:
            flat = x.flatten().cpu()
            room = self.max_samples - self.n_kept
            per_batch = max(self.max_samples // 8, 1)
            take = min(flat.numel(), per_batch, max(room, 0))
            if take < flat.numel():
                idx = torch.randperm(flat.numel(), generator=self._gen)[:take]
                flat = flat[idx]
            if take > 0:
                self.samples.append(flat)
                self.n_kept += take

    def sample(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.lo is None:
            raise RuntimeError("calibrator saw no data")
        return self.lo, self.hi


class MinMax(Calibrator):
    """``[min x, max x]`` over every observed batch."""


class EMAMinMax(Calibrator):
    """Exponential moving average of per-batch min and max (``momentum`` = weight of new)."""

    def __init__(self, *args, momentum: float = 0.1, **kw) -> None:
        super().__init__(*args, **kw)
        self.momentum = momentum
        self.ema: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().min().float().cpu(), x.detach().max().float().cpu()
        if self.ema is None:
            self.ema = (lo, hi)
        else:
            c = self.momentum
            self.ema = ((1 - c) * self.ema[0] + c * lo, (1 - c) * self.ema[1] + c * hi)
        super().observe(x)

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.ema is None:
            raise RuntimeError("calibrator saw no data")
        return self.ema


class Percentile(Calibrator):
    """Quantiles: ``[q_{1-p}, q_p]`` of ``x``, or ``+-q_p(|x|)`` when symmetric."""

    needs_sample = True

    def __init__(self, *args, percentile: float = 99.99, **kw) -> None:
        super().__init__(*args, **kw)
        self.p = percentile / 100.0

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        s = self.sample().double()
        if self.symmetric:
            t = torch.quantile(s.abs(), self.p).float()
            return torch.maximum(-t, lo), torch.minimum(t, hi)
        return torch.quantile(s, 1 - self.p).float(), torch.quantile(s, self.p).float()


def mse_range(
    x: Tensor,
    bits: int,
    symmetric: bool,
    granularity: str = "per_tensor",
    axis: int = 0,
    group_size: int = 128,
    grid: int = 80,
    min_ratio: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Per group, the clipped range ``alpha * [lo, hi]`` minimising the quantization MSE.

    ``alpha`` runs over ``grid`` values in ``[min_ratio, 1]``; each group (tensor, channel or
    group) picks its own ``alpha``.
    """
    x = x.detach().float()
    lo, hi = reduce_range(x, granularity, axis, group_size)
    q_min, q_max = qrange(bits, symmetric)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    if granularity == "per_channel":
        ax = axis % x.dim()
        dims = [d for d in range(x.dim()) if d != ax]
    for alpha in torch.linspace(min_ratio, 1.0, grid).tolist():
        c_lo, c_hi = lo * alpha, hi * alpha
        scale, zp = choose_qparams(c_lo, c_hi, bits, symmetric)
        err = (fake_quantize_grouped(x, scale, zp, q_min, q_max, granularity, group_size) - x) ** 2
        if granularity == "per_tensor":
            e = err.sum()
        elif granularity == "per_channel":
            e = err.sum(dim=dims, keepdim=True)
        else:
            from hawq.quant.primitives import group_view

            e = group_view(err, group_size).sum(dim=-1, keepdim=True)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


class MSE(Calibrator):
    """Clipping threshold minimising the quantization MSE on the sample."""

    needs_sample = True

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        s = self.sample()
        s = torch.cat([s, lo.reshape(1), hi.reshape(1)])  # the extremes always in the search
        return mse_range(s, self.bits, self.symmetric)


def kl_threshold(abs_values: np.ndarray, n_levels: int, bins: int = 2048) -> float:
    """TensorRT-style entropy calibration: the threshold on ``|x|`` minimising ``KL(P||Q)``."""
    amax = float(abs_values.max()) if abs_values.size else 0.0
    if amax <= 0:
        return 0.0
    hist, edges = np.histogram(abs_values, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    if bins > 1:  # exact zeros (post-ReLU) pile into bin 0: a spike the grid keeps exactly;
        hist[0] = hist[1]  # left in, it dominates P and drags the threshold down (TensorRT)
    best_kl, best_i = np.inf, bins
    for i in range(n_levels, bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        # merge the i bins into n_levels buckets, spread each back over its non-empty bins
        bucket = (np.arange(i) * n_levels) // i
        sums = np.bincount(bucket, weights=hist[:i], minlength=n_levels)
        counts = np.bincount(bucket, weights=nonzero.astype(np.float64), minlength=n_levels)
        q = np.where(nonzero, sums[bucket] / np.maximum(counts[bucket], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        with np.errstate(divide="ignore"):
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl <= best_kl:  # ties: the widest range (TensorRT's last argmin)
            best_kl, best_i = kl, i
    return float(edges[best_i])


class Entropy(Calibrator):
    """Range ``[-t, t]`` (clipped to the data) with the KL-optimal threshold ``t``.

    Non-negative data (post-ReLU/softmax) uses the unsigned level count ``2^b``;
    signed data ``2^(b-1)``.
    """

    needs_sample = True

    def __init__(self, *args, bins: int = 2048, **kw) -> None:
        super().__init__(*args, **kw)
        self.bins = bins

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        s = self.sample().numpy()
        signed = float(lo) < 0
        n_levels = 2 ** (self.bits - 1) if signed else 2**self.bits
        t = torch.tensor(kl_threshold(np.abs(s), max(n_levels, 2), self.bins), dtype=torch.float32)
        return torch.maximum(-t, lo), torch.minimum(t, hi)


CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMax,
    "ema_minmax": EMAMinMax,
    "percentile": Percentile,
    "mse": MSE,
    "entropy": Entropy,
}


def make_calibrator(name: str, bits: int, symmetric: bool, **options) -> Calibrator:
    """A fresh calibrator by name (see :data:`CALIBRATORS`)."""
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; allowed: {sorted(CALIBRATORS)}")
    return CALIBRATORS[name](bits, symmetric, **options)
