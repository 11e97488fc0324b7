"""Entropy (KL) calibration against an independent TensorRT-style reference (issue 15
item 8): on non-negative data with many exact zeros the zero-bin spike must not drag
the threshold down."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq.quant.calibrators import kl_threshold, make_calibrator


def reference_amax(values: np.ndarray, num_bits: int, unsigned: bool, bins: int = 2048,
                   start_bin: int = 128) -> float:  # fmt: skip
    """TensorRT / pytorch-quantization ``_compute_amax_entropy``, written out loop by loop:
    histogram ``|x|``; the first bin is set to the second (the spike of exact zeros is not
    information the quantizer can lose); for each candidate end bin ``i`` compare the
    clipped reference ``P`` (tail folded into bin ``i-1``) with ``Q`` (``P`` merged into
    ``2^(b-1+unsigned)`` levels and spread over the non-empty bins); the last argmin wins.
    """
    hist, edges = np.histogram(np.abs(values), bins=bins, range=(0, np.abs(values).max()))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    nbins = 1 << (num_bits - 1 + int(unsigned))
    divergences, args = [], []
    for i in range(start_bin, bins + 1):
        space = np.linspace(0, i, num=nbins + 1)
        dig = np.digitize(np.arange(i), space) - 1
        dig[hist[:i] == 0] = -1
        keep = dig != -1
        counts = np.bincount(dig[keep], weights=hist[:i][keep], minlength=nbins)
        members = np.bincount(dig[keep], minlength=nbins)
        q = np.where(keep, counts[dig] / np.maximum(members[dig], 1), 0.0)
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / q), 0.0)  # q == 0 < p: infinite
        divergences.append(float(np.sum(terms)))
        args.append(i)
    d = np.array(divergences)
    last = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[args[last]])


def _mse_unsigned(x: np.ndarray, t: float, bits: int) -> float:
    s = t / (2**bits - 1)
    return float(np.mean((np.clip(np.round(x / s), 0, 2**bits - 1) * s - x) ** 2))


def _relu_like(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "relu_gauss":  # half exact zeros
        return np.maximum(rng.standard_normal(n), 0.0)
    if kind == "relu_laplace":
        return np.maximum(rng.laplace(size=n), 0.0)
    if kind == "zeros_lognormal":  # 60 % zeros, heavy tail
        return np.where(rng.random(n) < 0.6, 0.0, rng.lognormal(0.0, 0.7, n))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["relu_gauss", "relu_laplace", "zeros_lognormal"])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_threshold_matches_reference_on_relu_like_data(kind, bits):
    x = _relu_like(kind, 60_000, np.random.default_rng(bits))
    ref = reference_amax(x, bits, unsigned=True)
    c = make_calibrator("entropy", bits, False, max_samples=1 << 20)
    c.observe(torch.from_numpy(x).float())
    lo, hi = c.compute()
    assert float(lo) == 0.0
    t = float(hi)
    # the same threshold up to a couple of histogram bins (our search starts at 2^b bins)
    assert abs(t - ref) <= 0.03 * ref + 3 * x.max() / 2048, (t, ref)
    assert _mse_unsigned(x, t, bits) <= 1.1 * _mse_unsigned(x, ref, bits)


def test_zero_spike_does_not_change_the_threshold():
    """Adding exact zeros (information-free for the quantizer) leaves the threshold put."""
    rng = np.random.default_rng(0)
    pos = np.abs(rng.standard_normal(30_000))
    base = kl_threshold(pos, 2**8)
    for frac in (0.5, 0.8, 0.95):
        zeros = np.zeros(int(len(pos) * frac / (1 - frac)))
        t = kl_threshold(np.concatenate([pos, zeros]), 2**8)
        assert t == pytest.approx(base, rel=0.05), (frac, t, base)
