"""Float formats against torch's own float8 casts and the specs' value sets."""

import pytest
import torch

from hawq.quant.formats import (
    MINIFLOATS,
    fp8_fake_quantize,
    mx_fake_quantize,
    nf4_fake_quantize,
    nf4_levels,
    round_minifloat,
)


@pytest.mark.parametrize(("fmt", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn),
                                            ("fp8_e5m2", torch.float8_e5m2)])
def test_minifloat_rounding_equals_torch_cast(fmt, dtype):
    v_max = MINIFLOATS[fmt][2]
    x = torch.cat([torch.randn(20000) * s for s in (1e-6, 1e-3, 1.0, 30.0, v_max / 3)])
    x = x.clamp(-v_max, v_max)
    assert torch.equal(round_minifloat(x, fmt), x.to(dtype).float())


def test_fp8_scaled_per_channel():
    w = torch.randn(8, 32) * torch.logspace(-3, 3, 8)[:, None]
    y = fp8_fake_quantize(w, "fp8_e4m3", granularity="per_channel")
    rel = ((y - w).abs().amax(1) / w.abs().amax(1))
    assert (rel < 2**-4).all()  # 3 mantissa bits: relative error <= 2^-4 at each channel's scale
    assert torch.allclose(y.abs().amax(1), w.abs().amax(1), rtol=2**-4)


def test_fp4_e2m1_values():
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    x = torch.linspace(-7, 7, 1001)
    y = round_minifloat(x, "fp4_e2m1")
    assert set(y.abs().unique().tolist()) <= set(grid.tolist())


def test_nf4_levels_and_quantizer():
    lv = nf4_levels()
    assert lv.numel() == 16 and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
    # published NF4 values (QLoRA appendix)
    assert torch.allclose(lv[[1, 8, 14]], torch.tensor([-0.6962, 0.0796, 0.7230]), atol=1e-4)
    w = torch.randn(4, 128)
    y = nf4_fake_quantize(w, 64)
    g = w.reshape(4, 2, 64)
    absmax = g.abs().amax(-1, keepdim=True)
    codes = y.reshape(4, 2, 64) / absmax
    assert (codes[..., None] - lv).abs().amin(-1).max() < 1e-6  # every value is a level
    assert torch.equal(nf4_fake_quantize(y, 64), y)  # idempotent


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8"])
def test_mx_block_scale_is_power_of_two(fmt):
    w = torch.randn(4, 64) * 3
    y = mx_fake_quantize(w, fmt)
    blocks = w.reshape(4, 2, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - (2 if fmt == "mxfp4" else 0))
    p = y.reshape(4, 2, 32) / scale
    if fmt == "mxfp4":
        assert torch.equal(round_minifloat(p, "fp4_e2m1"), p)
    else:
        assert torch.equal((p * 64).round(), p * 64) and (p.abs() <= 127 / 64).all()
    assert torch.equal(mx_fake_quantize(y, fmt), y)
    err = (y - w).abs().reshape(4, 2, 32).amax(-1) / amax.squeeze(-1)
    assert (err < (0.26 if fmt == "mxfp4" else 0.02)).all()
