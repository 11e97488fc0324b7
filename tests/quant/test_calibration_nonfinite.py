"""NaN/Inf during calibration stop it with one line naming the op and the operand
(issue 15 item 10), for every calibrator, in the data, a weight, or mid-network."""

from __future__ import annotations

import math

import pytest
import torch

from hawq.errors import HawqError
from hawq.quant import OpSetting, Plan, calibrate, make_calibrator, quantize_
from hawq.quant.plan import CALIBRATORS

from .cases import tiny_vit

BAD = [math.nan, math.inf, -math.inf]


def _quantized(calibrator: str = "minmax"):
    return quantize_(tiny_vit(), Plan(OpSetting(calibrator=calibrator)))


def _batches(n: int = 3, bad_batch: int | None = None, value: float = math.nan):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, 32, 32, generator=g)
        if i == bad_batch:
            x[1, 2, 5, 7] = value
        out.append((x, torch.zeros(4, dtype=torch.long)))
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("calibrator", CALIBRATORS)
@pytest.mark.parametrize("value", BAD)
def test_bad_value_in_a_batch_names_the_first_op_and_batch(calibrator, value):
    model = _quantized(calibrator)
    with pytest.raises(HawqError) as e:
        calibrate(model, _batches(3, bad_batch=1, value=value))
    msg = _one_line(e)
    assert "op patch_embed operand input" in msg and "batch 1" in msg, msg
    assert ("1 NaN" in msg) if math.isnan(value) else ("1 Inf" in msg), msg


@pytest.mark.parametrize("value", BAD)
def test_bad_weight_names_the_op_and_operand_weight(value):
    model = _quantized()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 4] = value
    with pytest.raises(HawqError) as e:
        calibrate(model, _batches())
    assert "op blocks.1.mlp.fc1 operand weight" in _one_line(e)


@pytest.mark.parametrize("value", BAD)
def test_bad_value_mid_network_names_the_matmul_operand(value):
    model = _quantized()
    with torch.no_grad():  # q of head 0 at channel 0 becomes NaN/Inf: qkv's output feeds q@k^T
        model.blocks[1].attn.qkv.bias[0] = value
    with pytest.raises(HawqError) as e:
        calibrate(model, _batches())
    assert "op blocks.1.attn.qk operand a" in _one_line(e)


@pytest.mark.parametrize("name", CALIBRATORS)
@pytest.mark.parametrize("value", BAD)
def test_calibrators_refuse_non_finite_input(name, value):
    c = make_calibrator(name, 8, False)
    x = torch.randn(100)
    x[7] = value
    with pytest.raises(HawqError, match="NaN/Inf"):
        c.observe(x)


def test_finite_calibration_still_works():
    model = _quantized("mse")
    assert calibrate(model, _batches()) == 3
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
