"""MX blocks along the reduction dim with a padded last block (OCP MX v1.0; issue 15
item 9), checked against a reference that quantizes each dot product's vectors in
32-element chunks, written independently with numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawq.quant import OpSetting, Plan, quantize_
from hawq.quant.formats import mx_fake_quantize
from hawq.quant.modules import QuantConv2d, QuantLinear, QuantMatMul

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _e2m1(p: float) -> float:
    a = min(abs(p), 6.0)
    d = np.abs(E2M1 - a)
    best = np.flatnonzero(d == d.min())
    k = best[0] if len(best) == 1 else best[best % 2 == 0][0]  # tie: even mantissa
    return float(np.copysign(E2M1[k], p))


def _ref_vector(v: np.ndarray, fmt: str) -> np.ndarray:
    out = np.empty_like(v)
    for start in range(0, len(v), 32):  # the last chunk may be shorter
        chunk = v[start:start + 32]
        amax = np.abs(chunk).max()
        e = (np.floor(np.log2(amax)) if amax > 0 else -127) - (2 if fmt == "mxfp4" else 0)
        scale = 2.0 ** np.clip(e, -127, 127)
        p = chunk / scale
        if fmt == "mxfp4":
            q = np.array([_e2m1(x) for x in p])
        else:
            q = np.clip(np.round(p * 64), -127, 127) / 64
        out[start:start + 32] = q * scale
    return out


def ref_mx(x: torch.Tensor, axis: int, fmt: str) -> torch.Tensor:
    a = np.moveaxis(x.detach().double().numpy(), axis, -1).copy()
    flat = a.reshape(-1, a.shape[-1])
    for r in range(flat.shape[0]):
        flat[r] = _ref_vector(flat[r], fmt)
    return torch.from_numpy(np.moveaxis(flat.reshape(a.shape), -1, axis)).to(x.dtype)


def _setting(fmt: str, weights: bool = False) -> OpSetting:
    return OpSetting(w_bits=(4 if fmt == "mxfp4" else 8) if weights else None,
                     a_bits=4 if fmt == "mxfp4" else 8, w_format=fmt, a_format=fmt)  # fmt: skip


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8"])
@pytest.mark.parametrize("shape,axis", [((2, 3, 65, 40), -1), ((2, 3, 40, 65), -2),
                                        ((5, 48), -1), ((2, 40, 3, 3), 1), ((7,), -1)])
def test_blocks_follow_the_axis_with_padding(fmt, shape, axis):
    x = torch.randn(*shape) * torch.exp(torch.randn(*shape))
    assert torch.equal(mx_fake_quantize(x, fmt, axis=axis), ref_mx(x, axis, fmt))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8"])
def test_attention_operands_block_along_their_reduction_dim(fmt):
    torch.manual_seed(0)
    b_, h, t, d = 2, 3, 65, 40  # 65 tokens, head dim 40: neither a multiple of 32
    q, k, v = (torch.randn(b_, h, t, d) for _ in range(3))
    qk = QuantMatMul(_setting(fmt))
    kt = k.transpose(-2, -1)  # (B, h, d, T): reduction over d = dim -2
    ref = ref_mx(q, -1, fmt) @ ref_mx(kt, -2, fmt)
    assert torch.allclose(qk(q, kt), ref, atol=1e-5, rtol=1e-5)
    p = torch.softmax(q @ kt / d**0.5, dim=-1)  # (B, h, T, T): reduction over keys
    av = QuantMatMul(_setting(fmt))
    ref = ref_mx(p, -1, fmt) @ ref_mx(v, -2, fmt)  # v (B, h, T, d): reduction over T
    assert torch.allclose(av(p, v), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8"])
def test_patch_embedding_of_width_48_and_conv(fmt):
    torch.manual_seed(1)
    lin = nn.Linear(48, 64)
    ql = QuantLinear(lin, _setting(fmt, weights=True))
    x = torch.randn(2, 64, 48)  # (B, patches, 4*4*3)
    ref = nn.functional.linear(ref_mx(x, -1, fmt), ref_mx(lin.weight, -1, fmt), lin.bias)
    assert torch.allclose(ql(x), ref, atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(40, 8, 3, padding=1)
    qc = QuantConv2d(conv, _setting(fmt, weights=True)).eval()
    xc = torch.randn(2, 40, 5, 5)
    ref = nn.functional.conv2d(ref_mx(xc, 1, fmt), ref_mx(conv.weight, 1, fmt), conv.bias,
                               padding=1)  # fmt: skip
    assert torch.allclose(qc(xc), ref, atol=1e-4, rtol=1e-5)


def test_quantize_uses_reduction_blocks_in_a_vit():
    from .cases import tiny_vit

    model = tiny_vit()
    quantize_(model, Plan(_setting("mxint8", weights=True)))
    mm = [m for m in model.modules() if isinstance(m, QuantMatMul)]
    assert mm and all(m.a_quant.block_axis == -1 and m.b_quant.block_axis == -2 for m in mm)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
