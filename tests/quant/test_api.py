"""quantize_: exactly the named ops change; BN folding; checkpoints; plan errors."""

import pytest
import torch
from torch import nn

from hawq.errors import HawqError
from hawq.models import quantizable_ops
from hawq.quant import (
    OpSetting,
    Plan,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    calibrate,
    check_ready,
    find_conv_bn_pairs,
    fold_conv_bn,
    load_quantized,
    quantize_,
    quantizers,
    save_quantized,
    set_bits_,
)

from .cases import batches, tiny_resnet, tiny_vit

FP = {"w_bits": None, "a_bits": None}


def test_quantize_changes_exactly_the_named_ops():
    model = tiny_vit().eval()
    before = quantizable_ops(model)
    named = {"blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 4}, "blocks.1.attn.qk": {"a_bits": 6},
             "head": {"w_bits": 2, "a_bits": 8}}  # fmt: skip
    plan = Plan.from_dict({"_default": FP, **named})
    ids = {n: id(m) for n, m in model.named_modules()}
    quantize_(model, plan)
    after = quantizable_ops(model)
    assert list(after) == list(before)  # same op names, same order
    for name, m in after.items():
        if name in named:
            assert isinstance(m, (QuantLinear, QuantMatMul)), name
        else:
            assert id(m) == ids[name], f"{name} should be untouched"
    assert isinstance(after["blocks.1.attn.qk"], QuantMatMul)
    qk = after["blocks.1.attn.qk"]
    assert qk.a_quant.bits == 6 and qk.b_quant.bits == 6
    assert after["head"].w_quant.bits == 2
    # no other module changed: every new module lives under a named op
    changed = [n for n, m in model.named_modules() if n and id(m) != ids.get(n)]
    assert changed and all(n.startswith(tuple(named)) for n in changed)


def test_vit_all_ops_and_reload(tmp_path):
    model = tiny_vit().eval()
    plan = Plan(OpSetting(w_bits=4, a_bits=4, calibrator="percentile"))
    quantize_(model, plan, method="lsqplus")
    calibrate(model, batches(2))
    check_ready(model)
    x = batches(1, 8, seed=5)[0][0]
    cfg = {"_target_": "hawq.models.vit.ViT", "dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128,
           "dropout": 0.0}  # fmt: skip
    save_quantized(tmp_path / "q.pt", model, cfg, plan, "lsqplus")
    again, plan2, _ = load_quantized(tmp_path / "q.pt")
    assert plan2.to_dict() == plan.to_dict()
    assert torch.equal(model(x), again.eval()(x))


def test_folded_conv_bn_equals_unfolded_pair_in_eval():
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(4, 3, 8, 8)
    ref = bn(conv(x))
    assert torch.allclose(fold_conv_bn(conv, bn)(x), ref, atol=1e-5)
    q = QuantConv2d(conv, OpSetting(w_bits=8, a_bits=8), None, bn).eval()
    for quant in quantizers(q).values():
        quant.mode = "off"
    assert torch.allclose(q(x), ref, atol=1e-5)


def test_folded_bn_training_uses_batch_statistics_then_freezes():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    ref_conv, ref_bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
    ref_conv.load_state_dict(conv.state_dict())
    q = QuantConv2d(conv, OpSetting(w_bits=8, a_bits=8), None, bn).train()
    for quant in quantizers(q).values():
        quant.mode = "off"
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    assert torch.allclose(q(x), ref_bn.train()(ref_conv(x)), atol=1e-5)
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-5)
    q.bn_frozen.fill_(True)
    assert torch.allclose(q(x), ref_bn.eval()(ref_conv(x)), atol=1e-5)


def test_resnet_bn_pairs_and_folding():
    model = tiny_resnet().eval()
    pairs = find_conv_bn_pairs(model)
    assert pairs == {"conv1": "bn1", "layer1.0.conv1": "layer1.0.bn1", "layer1.0.conv2":
                     "layer1.0.bn2", "layer2.0.conv1": "layer2.0.bn1", "layer2.0.conv2":
                     "layer2.0.bn2", "layer3.0.conv1": "layer3.0.bn1", "layer3.0.conv2":
                     "layer3.0.bn2"}  # fmt: skip
    x = batches(1, 8)[0][0]
    ref = model(x)
    quantize_(model, Plan(OpSetting(w_bits=8, a_bits=8)))
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    calibrate(model, batches(2))
    out = model(x)
    assert ((out - ref).norm() / ref.norm()) < 0.05  # W8A8 with folded BN ~ the FP model


def test_progressive_bits_keep_range():
    model = tiny_vit().eval()
    plan = Plan(OpSetting(w_bits=2, a_bits=2))
    quantize_(model, plan, method="lsq")
    set_bits_(model, plan, 8)
    calibrate(model, batches(1))
    q = model.blocks[0].attn.qkv.a_quant
    assert q.bits == 8
    lo8, hi8 = q.real_range()
    set_bits_(model, plan, 4)
    lo4, hi4 = q.real_range()
    assert q.bits == 4 and abs(float(hi4 - lo4) / float(hi8 - lo8) - 1) < 0.1
    set_bits_(model, plan, None)
    assert q.bits == 2 and model.head.w_quant.bits == 2


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"nope.op": {"w_bits": 4}}, "plan names op\\(s\\) not in the model: nope.op"),
        ({"_default": {"w_bits": 9}}, "w_bits=9 is invalid; allowed: an integer 1-8"),
        ({"head": {"w_format": "fp7"}}, "w_format='fp7' is invalid"),
        ({"head": {"calibrator": "magic"}}, "calibrator='magic' is invalid"),
        ({"head": {"w_format": "nf4", "w_bits": 8}}, "nf4 stores 4 bits"),
    ],
)
def test_bad_plans_fail_with_one_line(plan, message):
    with pytest.raises(HawqError, match=message) as e:
        quantize_(tiny_vit(), Plan.from_dict(plan))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nf4", "mxfp4", "mxint8"])
def test_float_formats_through_quantize(fmt):
    from hawq.quant.formats import FORMAT_BITS

    model = tiny_vit().eval()
    x = batches(1, 8)[0][0]
    ref = model(x)
    b = FORMAT_BITS[fmt]
    quantize_(model, Plan(OpSetting(w_bits=b, a_bits=b, w_format=fmt, a_format=fmt,
                                    group_size=64)))  # fmt: skip
    calibrate(model, batches(1))
    check_ready(model)
    rel = ((model(x) - ref).norm() / ref.norm()).item()
    assert 0 < rel < {"fp8_e4m3": 0.1, "fp8_e5m2": 0.25, "mxint8": 0.1}.get(fmt, 0.5)
