"""Sensitivities use the quantizer that will be deployed (issue 15 item 5): the weight and
activation errors equal those of the model ``quantize_`` + ``calibrate`` build for the
candidate (MSE clipping, unsigned grid for non-negative inputs, folded BN, formats)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from hawq.alloc import Candidate
from hawq.alloc.quant_error import activation_errors, weight_errors
from hawq.quant import Plan, calibrate, quantize_
from hawq.quant.api import quant_ops
from hawq.quant.plan import OpSetting


class Net(nn.Module):
    """conv -> BN -> ReLU -> linear (ReLU input: non-negative) -> linear (signed input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(self.fc1(h))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.2, 3.0)
        net.bn.weight.uniform_(0.3, 2.0)
        net.bn.bias.uniform_(-0.3, 0.3)
    return net


KINDS = {"conv": "conv2d", "fc1": "linear", "fc2": "linear"}
BASES = [OpSetting(calibrator="mse", granularity="per_channel", a_symmetric=True),
         OpSetting(calibrator="minmax", granularity="per_group", group_size=16,
                   symmetric=False, a_symmetric=True),
         OpSetting(calibrator="percentile", granularity="per_tensor", a_symmetric=False),
         pytest.param(OpSetting(calibrator="entropy", granularity="per_channel",
                                a_symmetric=True), marks=pytest.mark.slow),
         OpSetting(dynamic=True, a_symmetric=True)]  # fmt: skip
CANDS = [Candidate(4, 4), Candidate(3, 8), Candidate(2, 3)]


def _deployed(net: Net, name: str, setting: OpSetting, x: torch.Tensor, fold: bool):
    """Quantize only ``name`` with ``setting``; return (weight error in the FP weight's
    coordinates, per-sample activation error) of the deployed model."""
    fp = Plan(replace(setting, w_bits=None, a_bits=None), {name: setting})
    model = quantize_(copy.deepcopy(net), fp, fold_bn=fold)
    calibrate(model, [(x, None)])
    op = quant_ops(model)[name]
    if fold and name == "conv":
        w_f = op.folded()[0]
        inv = (net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)).reshape(-1, 1, 1, 1)
        w_err = float((((op.quantized_weight() - w_f) / inv).detach().double() ** 2).sum())
    else:
        w_err = float(((op.quantized_weight() - op.weight).detach().double() ** 2).sum())
    seen = {}

    def hook(m, args, out):
        seen["e"] = float(((out - args[0]).double() ** 2).sum()) / x.shape[0]

    h = op.a_quant.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    return w_err, seen["e"]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("fold", [True, False])
def test_errors_equal_the_deployed_quantizers(base, fold):
    net = _net()
    x = torch.randn(16, 3, 8, 8)
    mods = dict(net.named_modules())
    op_cands = {n: (k, CANDS) for n, k in KINDS.items()}
    a_err, _ = activation_errors(net, [(x, None)], op_cands, base, images=16, rel_se=1.0)
    for name, kind in KINDS.items():
        bn = net.bn if fold and name == "conv" else None
        w_err = weight_errors(mods[name], kind, CANDS, base, bn, name)
        for c in CANDS:
            want_w, want_a = _deployed(net, name, c.to_setting(base), x, fold)
            assert w_err[(c.w_bits, "int")] == pytest.approx(want_w, rel=1e-5), (name, c)
            assert a_err[name]["x"][c.a_level] == pytest.approx(want_a, rel=1e-5), (name, c)


@pytest.mark.parametrize("fmt,bits", [("mxint8", 8), ("mxfp4", 4), ("fp8_e4m3", 8)])
def test_float_format_errors_equal_the_deployed_quantizers(fmt, bits):
    net = _net()
    x = torch.randn(16, 3, 8, 8)
    base = OpSetting()
    c = Candidate(bits, bits, fmt, fmt)
    mods = dict(net.named_modules())
    a_err, _ = activation_errors(net, [(x, None)], {n: (k, [c]) for n, k in KINDS.items()},
                                 base, images=16, rel_se=1.0)  # fmt: skip
    for name, kind in KINDS.items():
        w_err = weight_errors(mods[name], kind, [c], base, None, name)
        want_w, want_a = _deployed(net, name, c.to_setting(base), x, fold=False)
        assert w_err[(bits, fmt)] == pytest.approx(want_w, rel=1e-5), name
        assert a_err[name]["x"][c.a_level] == pytest.approx(want_a, rel=1e-5), name


def test_unsigned_grid_for_non_negative_inputs_halves_the_step():
    """fc1 reads a ReLU output: with a symmetric activation grid the deployed quantizer is
    unsigned (2^b levels on [0, max]); a signed grid would waste half of them."""
    net = _net()
    x = torch.randn(32, 3, 8, 8)
    base = OpSetting(a_symmetric=True)
    a_err, _ = activation_errors(net, [(x, None)], {"fc1": ("linear", [Candidate(8, 4)])},
                                 base, images=32, rel_se=1.0)  # fmt: skip
    h = {}
    def keep(_m, args, _out) -> None:
        h["a"] = args[0]

    net.fc1.register_forward_hook(keep)
    with torch.no_grad():
        net(x)
    a = h["a"].double()
    assert (a >= 0).all()
    s = float(a.max()) / 15  # unsigned 4-bit: 16 levels on [0, max]
    want = float(((torch.clamp(torch.round(a / s), 0, 15) * s - a) ** 2).sum()) / 32
    assert a_err["fc1"]["x"][(4, "int")] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("base", [OpSetting(), OpSetting(dynamic=True),
                                  OpSetting(calibrator="mse")])  # fmt: skip
def test_non_finite_calibration_data_names_op_and_operand(value, base):
    from hawq.errors import HawqError

    net = _net()
    x = torch.randn(8, 3, 8, 8)
    x[3, 1, 2, 2] = value
    op_cands = {n: (k, CANDS) for n, k in KINDS.items()}
    with pytest.raises(HawqError, match=r"op conv operand x has \d+ NaN and \d+ Inf") as e:
        activation_errors(net, [(x, None)], op_cands, base, images=8)
    assert "\n" not in str(e.value)
    with torch.no_grad():
        net.fc2.weight[1, 2] = value
    with pytest.raises(HawqError, match="op fc2 operand weight"):
        weight_errors(net.fc2, "linear", CANDS, base, None, "fc2")
