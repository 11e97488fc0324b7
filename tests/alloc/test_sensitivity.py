"""Sensitivity formulas on tiny layers, against hand-computed quantization errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawq.alloc import Candidate, OpCurvature
from hawq.alloc.sensitivity import (
    activation_errors,
    hawq_sensitivity,
    measured_sensitivity,
    noise_proxy,
    random_sensitivity,
    uniform_sensitivity,
    weight_errors,
)
from hawq.models.ops import MatMul
from hawq.quant.plan import OpSetting

W = np.array([[0.5, -1.0, 0.26], [0.1, 0.2, -0.05]])


def _sym_per_channel(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric signed grid [-2^(b-1), 2^(b-1)-1], scale max|w_row| / ((q_max - q_min)/2)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np.abs(w).max(axis=1, keepdims=True) / ((qmax - qmin) / 2)
    return np.clip(np.round(w / s), qmin, qmax) * s


def _affine(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Unsigned affine grid [0, 2^b - 1] over [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    s = (hi - lo) / qmax
    z = np.clip(np.round(-lo / s), 0, qmax)
    return (np.clip(np.round(x / s) + z, 0, qmax) - z) * s


def _linear() -> nn.Linear:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W))
        lin.bias.zero_()
    return lin


def test_weight_error_by_hand():
    cands = [Candidate(4, 8), Candidate(3, 8), Candidate(None, 8), Candidate(4, 4)]
    err = weight_errors(_linear(), "linear", cands,
                        OpSetting(granularity="per_channel", symmetric=True))  # fmt: skip
    for bits in (4, 3):
        assert err[(bits, "int")] == pytest.approx(((_sym_per_channel(W, bits) - W) ** 2).sum(),
                                                  rel=1e-5)  # fmt: skip
    assert err[(None, "int")] == 0.0 and len(err) == 3  # one entry per distinct weight level


def test_activation_error_static_minmax_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(_linear())
    xs = [torch.randn(5, 3) * 2 + 0.3, torch.randn(7, 3)]
    batches = [(x, None) for x in xs]
    op = {"0": ("linear", [Candidate(8, 4), Candidate(8, 8)])}
    got, info = activation_errors(model, batches, op, OpSetting(a_symmetric=False), images=12)
    assert info["images"] == 12
    allx = torch.cat(xs).numpy().astype(np.float64)
    lo, hi = float(allx.min()), float(allx.max())  # one static range over all images
    for bits in (4, 8):
        want = ((_affine(allx, lo, hi, bits) - allx) ** 2).sum() / len(allx)  # per sample
        assert got["0"]["x"][(bits, "int")] == pytest.approx(want, rel=1e-4)
    # images=5 uses the first 5 images only (one pass, its own range)
    one, _ = activation_errors(model, batches, op, OpSetting(dynamic=True), images=5,
                               max_images=5)  # fmt: skip
    x0 = xs[0].double().numpy()
    want = ((_affine(x0, float(x0.min()), float(x0.max()), 8) - x0) ** 2).sum() / 5
    assert one["0"]["x"][(8, "int")] == pytest.approx(want, rel=1e-4)


class QK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mm = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(x, x.transpose(-2, -1) * 3)


def test_matmul_has_one_error_per_operand():
    x = torch.randn(4, 5, 6)
    got, _ = activation_errors(QK(), [(x, None)], {"mm": ("matmul", [Candidate(4, 4)])},
                               OpSetting(dynamic=True), images=4)  # fmt: skip
    a = x.double().numpy()
    b = np.swapaxes(a, -2, -1) * 3
    for k, t in (("a", a), ("b", b)):
        want = ((_affine(t, t.min(), t.max(), 4) - t) ** 2).sum() / 4
        assert got["mm"][k][(4, "int")] == pytest.approx(want, rel=1e-4)


def _curv(kind: str = "linear") -> OpCurvature:
    acts = {"x": 2.0} if kind == "linear" else {"a": 2.0, "b": 6.0}
    numel = {"x": 30} if kind == "linear" else {"a": 30, "b": 10}
    return OpCurvature("op", kind, 8 if kind == "linear" else 0, 100, trace=4.0, top_eig=3.0,
                       act_trace=acts, act_numel=numel)  # fmt: skip


def test_hawq_formulas():
    cands = [Candidate(4, 4), Candidate(4, 8), Candidate(None, None)]
    w_err = {(4, "int"): 0.5, (None, "int"): 0.0}
    a_err = {"x": {(4, "int"): 3.0, (8, "int"): 0.1}}
    v3 = hawq_sensitivity(_curv(), cands, w_err, a_err, "hawq_v3_act")
    # trace/numel * ||dW||^2 + act_trace/act_numel * E||da||^2
    assert v3 == pytest.approx([4 / 8 * 0.5 + 2 / 30 * 3.0, 4 / 8 * 0.5 + 2 / 30 * 0.1, 0.0])
    assert hawq_sensitivity(_curv(), cands, w_err, a_err, "hawq_v2") == pytest.approx(v3)
    v1 = hawq_sensitivity(_curv(), cands, w_err, a_err, "hawq_v1")
    assert v1 == pytest.approx([3 / 8 * 0.5 + 2 / 30 * 3.0, 3 / 8 * 0.5 + 2 / 30 * 0.1, 0.0])
    mm = hawq_sensitivity(_curv("matmul"), [Candidate(4, 4)], {},
                          {"a": {(4, "int"): 1.0}, "b": {(4, "int"): 2.0}})  # fmt: skip
    assert mm == pytest.approx([2 / 30 * 1.0 + 6 / 10 * 2.0])


def test_uniform_and_random_baselines():
    kinds = ["linear", "matmul", "linear"]
    cands = [[Candidate(4, 8), Candidate(8, 8)], [Candidate(4, 4)], [Candidate(None, 2)]]
    u = uniform_sensitivity(kinds, cands)
    assert list(u[0]) == pytest.approx([4.0**-4 + 4.0**-8, 2 * 4.0**-8])
    assert list(u[1]) == pytest.approx([2 * 4.0**-4])
    assert noise_proxy("linear", Candidate(None, 2)) == pytest.approx(4.0**-2)
    r1, r2 = random_sensitivity(kinds, cands, 1), random_sensitivity(kinds, cands, 1)
    assert all(np.array_equal(a, b) for a, b in zip(r1, r2, strict=True))
    scale = [a / b for a, b in zip(r1, u, strict=True)]  # one random factor per op
    assert all(np.allclose(s, s[0]) and 0 < s[0] < 1 for s in scale)
    r3 = random_sensitivity(kinds, cands, 2)
    assert not all(np.array_equal(a, b) for a, b in zip(r1, r3, strict=True))


def test_measured_drop_uses_quantize_and_is_zero_for_float():
    from hawq.quant.api import calibrate, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(256, 8)
    y = model(x).argmax(-1)  # labels = FP predictions: FP accuracy is 100 %

    def qfn(m, plan):
        quantize_(m, plan)
        calibrate(m, [(x, y)])
        return m

    def efn(m) -> float:
        with torch.no_grad():
            return 100.0 * float((m(x).argmax(-1) == y).float().mean())

    fp, drops = measured_sensitivity(model, {"0": [Candidate(None, None), Candidate(8, 8),
                                                   Candidate(2, 2)], "2": [Candidate(2, 2)]},
                                     OpSetting(), qfn, efn)  # fmt: skip
    assert fp == 100.0
    assert drops["0"][0] == 0.0  # float "setting": nothing quantized
    assert 0 <= drops["0"][1] < drops["0"][2]  # 8 bits barely hurts, 2 bits hurts more
    assert drops["2"][0] > 0
    assert isinstance(model[0], nn.Linear)  # the FP model itself was not modified


def test_negative_curvature_never_rewards_quantization_noise():
    from hawq.alloc.candidates import Candidate
    from hawq.alloc.report import OpCurvature
    from hawq.alloc.sensitivity import hawq_sensitivity

    curv = OpCurvature(name="fc", kind="linear", numel=10, macs=40, trace=-5.0, top_eig=-1.0,
                       act_trace={"x": -3.0}, act_numel={"x": 4})  # fmt: skip
    cands = [Candidate(w_bits=4, a_bits=4), Candidate(w_bits=8, a_bits=8)]
    w_err = {(c.w_bits, c.w_format): 1.0 / c.w_bits for c in cands}
    a_err = {"x": {c.a_level: 1.0 / c.a_bits for c in cands}}
    for method in ("hawq_v1", "hawq_v3"):
        assert (hawq_sensitivity(curv, cands, w_err, a_err, method) == 0).all()
