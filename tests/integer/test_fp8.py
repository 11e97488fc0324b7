"""FP8 path: float8 casts vs the fake quantizer, fp8_linear backends, convert_fp8, the stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.fp8 import FP8_DTYPES, Fp8Conv2d, Fp8Linear, convert_fp8, quantize_act, to_fp8
from hawq.quant import Plan
from hawq.quant.formats import MINIFLOATS, fp8_fake_quantize, round_minifloat
from hawq.quant.plan import OpSetting
from hawq.quant.quantizer import Quantizer
from tests.integer.cases import fake_quant, randomize_bn, tiny_resnet, tiny_vit

FMTS = list(FP8_DTYPES)
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_plan(fmt: str = "fp8_e4m3", **kw) -> Plan:
    return Plan(OpSetting(w_format=fmt, a_format=fmt, **kw))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns, with -0.0 read as +0.0 (the fake quantizer's STE adds a 0)."""
    return (t + 0.0).view(torch.int32)


def hard_values(fmt: str) -> torch.Tensor:
    """Every finite code, the midpoints between neighbours (ties), their float32 neighbours,
    subnormals, values past v_max, +-0 and random values at several magnitudes."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(FP8_DTYPES[fmt]).float()
    vals = codes[torch.isfinite(codes)].unique()  # sorted, both signs
    ties = (vals[1:] + vals[:-1]) / 2  # exact in float32
    v_max = MINIFLOATS[fmt][2]
    g = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(4000, generator=g) * m for m in (1e-5, 1e-2, 1.0, v_max / 4)])
    base = torch.cat([vals, ties, rand, torch.tensor([0.0, -0.0, 1.5 * v_max, -1e30, 1e30])])
    inf = torch.tensor(float("inf"))
    return torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf)])


# ---------------------------------------------------------------- casts


@pytest.mark.parametrize("fmt", FMTS)
def test_cast_equals_round_minifloat_bit_for_bit(fmt):
    y = hard_values(fmt)
    v_max = MINIFLOATS[fmt][2]
    cast = y.clamp(-v_max, v_max).to(FP8_DTYPES[fmt]).float()
    assert torch.equal(round_minifloat(y, fmt).view(torch.int32), cast.view(torch.int32))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scale", [0.25, 0.0371, 3e-5])
def test_to_fp8_equals_fake_quantizer(fmt, scale):
    x = hard_values(fmt) * scale  # a power-of-two scale keeps the ties exact ties
    s = torch.tensor(scale)
    got = to_fp8(x, s, fmt).float() * s
    assert torch.equal(bits(got), bits(fp8_fake_quantize(x, fmt, s)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_to_fp8_equals_activation_quantizer(fmt, dynamic):
    q = Quantizer(8, fmt, dynamic=dynamic)
    x = torch.randn(4, 65, 64) * 3
    q.start_observe()
    q(x)
    q.finish_observe()
    x8, s = quantize_act(x, fmt, None if dynamic else q.scale)
    assert x8.dtype == FP8_DTYPES[fmt]
    assert torch.equal(bits(x8.float() * s), bits(q(x)))


# ---------------------------------------------------------------- fp8_linear


def _operands(m, k, n, dx=E4, dw=E4, per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x8 = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(dx)
    w8 = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(dw)
    s_w = torch.rand(n, generator=g) * 1e-2 + 1e-3 if per_channel else torch.tensor(3e-3)
    return x8, w8, torch.tensor(0.021), s_w, torch.randn(n, generator=g)


def test_reference_dot_product_is_exact_for_e4m3():
    x8, w8, *_ = _operands(64, 512, 48)
    acc = x8.double() @ w8.double().t()
    # codes are integers times 2^-9: the exact dot product in int64
    exact = (x8.double() * 512).long() @ (w8.double() * 512).long().t()
    assert torch.equal(acc * 2**18, exact.double())


@pytest.mark.parametrize("dx,dw", [(E4, E4), (E4, E5), (E5, E4), (E5, E5)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(7, 33, 5), (64, 48, 192), (1, 16, 10)])
def test_scaled_mm_backend_matches_reference(dx, dw, per_channel, shape):
    x8, w8, s_x, s_w, b = _operands(*shape, dx, dw, per_channel)
    x8 = x8.reshape(1, *x8.shape)  # a leading batch dim: (1, M, K)
    with ops.backend("reference"):
        ref = ops.fp8_linear(x8, w8, s_x, s_w, b)
    with ops.backend("int_mm"):  # off the reference path: torch._scaled_mm (CPU kernel)
        got = ops.fp8_linear(x8, w8, s_x, s_w, b)
    dq = (x8.double() * s_x.double()) @ (w8.double() * s_w.double().reshape(-1, 1)).t() + b
    assert got.shape == ref.shape == (1, shape[0], shape[2]) and ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), dq, rtol=1e-6, atol=1e-6 * dq.abs().max().item())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dx,dw", [(E4, E4), (E4, E5), (E5, E5)])
@pytest.mark.parametrize("shape", [(4096, 512, 1536), (77, 48, 10)])
def test_scaled_mm_on_cuda_matches_reference(dx, dw, shape):
    x8, w8, s_x, s_w, b = (t.cuda() for t in _operands(*shape, dx, dw, per_channel=True))
    with ops.backend("reference"):
        ref = ops.fp8_linear(x8, w8, s_x, s_w, b)
    with ops.backend("auto"):
        got = ops.fp8_linear(x8, w8, s_x, s_w, b)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------- convert_fp8


def _op_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named op of ``model`` sees in ``model(x)``."""
    seen = {}

    def hook(name: str):
        def keep(_module, args, _out) -> None:
            seen[name] = args[0]

        return keep

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _check_ops(q: nn.Module, f: nn.Module, x: torch.Tensor) -> None:
    """Every fp8 op, fed the fake-quant op's own input, gives its output up to fp32 rounding."""
    for name, inp in _op_inputs(q, f.fp8_ops, x).items():
        with torch.no_grad():
            want, got = q.get_submodule(name)(inp), f.get_submodule(name)(inp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("fmt,dynamic", [("fp8_e4m3", False), ("fp8_e4m3", True),
                                         ("fp8_e5m2", False)])  # fmt: skip
def test_convert_fp8_vit_matches_fake_quant(fmt, dynamic):
    x = torch.randn(32, 3, 32, 32)
    q = fake_quant(tiny_vit(), x[:16], fp8_plan(fmt, dynamic=dynamic))
    f = convert_fp8(q)
    assert len(f.fp8_ops) == 10 and all(isinstance(f.get_submodule(n), Fp8Linear)
                                        for n in f.fp8_ops)  # fmt: skip
    assert f.fake_quant_ops == [f"blocks.{i}.attn.{m}" for i in (0, 1) for m in ("qk", "av")]
    assert f.get_submodule("head").weight.dtype == FP8_DTYPES[fmt]
    _check_ops(q, f, x)
    with torch.no_grad():
        yq, yf = q(x), f(x)
    # End to end, an fp32-rounding difference can move a value across an fp8 rounding
    # boundary downstream (one fp8 step); the logits stay within a few % of their range.
    assert (yf - yq).abs().max() <= 0.15 * yq.abs().max()
    agree = (yf.argmax(-1) == yq.argmax(-1)).float().mean().item()
    assert agree == 1.0 if (fmt, dynamic) == ("fp8_e4m3", False) else agree >= 0.9


def test_convert_fp8_static_e4m3_logits_on_scaled_mm():
    x = torch.randn(32, 3, 32, 32)
    q = fake_quant(tiny_vit(), x[:16], fp8_plan())
    f = convert_fp8(q)
    with torch.no_grad(), ops.backend("int_mm"):
        yq, yf = q(x), f(x)
    assert (yf - yq).abs().max() <= 0.15 * yq.abs().max()
    assert torch.equal(yf.argmax(-1), yq.argmax(-1))


def test_convert_fp8_resnet_convs_by_im2col():
    m = tiny_resnet()
    randomize_bn(m)
    x = torch.randn(16, 3, 32, 32)
    q = fake_quant(m, x, fp8_plan())
    f = convert_fp8(q)
    convs = [n for n in f.fp8_ops if isinstance(f.get_submodule(n), Fp8Conv2d)]
    assert len(convs) == 7 and f.fake_quant_ops == []
    _check_ops(q, f, x)


def test_fp8_conv_geometry_and_folded_bn():
    conv = nn.Sequential(nn.Conv2d(4, 16, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(16))
    randomize_bn(conv)
    x = torch.randn(3, 4, 11, 9)
    q = fake_quant(conv, x, fp8_plan(granularity="per_tensor"))
    f = convert_fp8(q)
    assert isinstance(f[0], Fp8Conv2d) and f[0].w_scale.dim() == 0
    _check_ops(q, f, x)


def test_convert_fp8_needs_an_fp8_op():
    q = fake_quant(tiny_vit(), torch.randn(8, 3, 32, 32))  # the default int8 plan
    with pytest.raises(HawqError, match="no op has fp8 weight and activation formats"):
        convert_fp8(q)


# ---------------------------------------------------------------- stage


def test_integer_stage_fp8_path(make_cfg):
    from hawq.io import load_torch
    from hawq.pipeline import run_pipeline

    cfg_args = ("experiment=smoke", "train.epochs=1", "data.train_subset=256",
                "data.test_subset=128", "data.batch_size=64", "data.eval_batch_size=128",
                "quant.calib_batches=1", "quant.calib_batch_size=64",
                "quant.default.w_format=fp8_e4m3", "quant.default.a_format=fp8_e4m3",
                "device=cpu")  # fmt: skip
    res = run_pipeline(make_cfg(*cfg_args, "stages=[train,ptq,integer]"))["stages"]
    r = res["integer"]
    assert r["path"] == "fp8" and r["fp8_ops"] == 10 and r["fake_quant_ops"] == 4
    assert r["n"] == 128 and r["agreement"] >= 95.0
    assert abs(r["fake_quant_acc"] - res["ptq"]["quantized"]["acc"]) < 1e-9
    saved = load_torch(r["checkpoint"])
    assert isinstance(saved.get_submodule("blocks.0.mlp.fc1"), Fp8Linear)
    # export writes integer-only graphs: an FP8 model is refused with one line
    from hawq.errors import HawqError

    with pytest.raises(HawqError, match="is an FP8 model .* FP8 plans have no integer graph"):
        run_pipeline(make_cfg(*cfg_args, "stages=[export]"))
