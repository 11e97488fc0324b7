"""Calibrators on known distributions."""

import pytest
import torch

from hawq.quant.calibrators import make_calibrator
from hawq.quant.primitives import choose_qparams, fake_quantize, qrange


def gaussian_with_outliers(n=30000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:10] = torch.randn(10, generator=g) * 40  # rare huge values
    return x


def mse_of(name, x, bits=4, symmetric=True, **options):
    c = make_calibrator(name, bits, symmetric, **options)
    for chunk in x.chunk(3):
        c.observe(chunk)
    lo, hi = c.compute()
    s, z = choose_qparams(lo, hi, bits, symmetric)
    return ((fake_quantize(x, s, z, *qrange(bits, symmetric)) - x) ** 2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("name", "options"), [("mse", {}), ("entropy", {}),
                                               ("percentile", {"percentile": 99.9})])
def test_clipping_calibrators_beat_minmax_with_outliers(name, options, symmetric):
    x = gaussian_with_outliers()  # 0.03% outliers: above the 99.9th percentile
    assert mse_of(name, x, 4, symmetric, **options) < 0.5 * mse_of("minmax", x, 4, symmetric)


def test_percentile_hits_the_quantile():
    x = torch.randn(20000) * 2 + 1
    c = make_calibrator("percentile", 8, False, percentile=99.0)
    c.observe(x)
    lo, hi = c.compute()
    assert abs(float(hi) - float(torch.quantile(x.double(), 0.99))) < 1e-5
    assert abs(float(lo) - float(torch.quantile(x.double(), 0.01))) < 1e-5
    # the 99% quantile of N(1, 2^2): 1 + 2 * 2.3263
    assert abs(float(hi) - (1 + 2 * 2.3263)) < 0.12


def test_minmax_and_ema():
    mm, ema = make_calibrator("minmax", 8, False), make_calibrator("ema_minmax", 8, False)
    for lo, hi in [(-1.0, 1.0), (-3.0, 2.0), (-1.0, 1.0)]:
        x = torch.tensor([lo, 0.0, hi])
        mm.observe(x)
        ema.observe(x)
    assert mm.compute() == (torch.tensor(-3.0), torch.tensor(2.0))
    e_lo, e_hi = ema.compute()
    assert abs(float(e_lo) - (0.9 * (0.9 * -1 + 0.1 * -3) + 0.1 * -1)) < 1e-6
    assert abs(float(e_hi) - (0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 1)) < 1e-6


def test_entropy_nonnegative_data_keeps_zero_lower_bound():
    x = torch.rand(20000) ** 3
    c = make_calibrator("entropy", 8, False)
    c.observe(x)
    lo, hi = c.compute()
    assert float(lo) == float(x.min()) and 0 < float(hi) <= float(x.max())
