"""ONNX QDQ export of fake-quant models, run in onnxruntime (CPU) against PyTorch.

Oracle: the PyTorch fake-quant model itself (``qmodel(x)``); ORT runs the exported file on
256 random images (the graph was traced at batch 2: the batch axis is symbolic).

Tolerance. The two engines sum conv/matmul products in different orders (float32 differences
~1e-7 relative). Where no activation lies that close to a rounding tie, the logits (magnitude
~1) agree to float precision, ``ATOL_EXACT`` = 1e-4; where one does, that element lands one
grid step away and the step propagates (through attention to every logit of the image). So:

* >= 75% of the images agree within ``ATOL_EXACT`` (a wrong scale, zero point or clip would
  move nearly every image);
* max |ORT - PyTorch| <= max |fake-quant - FP| of the same model: a flipped rounding is one
  extra quantization error on one element, so it cannot move the output further than
  quantizing every element already does;
* argmax agreement >= 97% (untrained tiny models: top-2 logit margins are often < 0.01).

Measured over 3 seeds x {ViT, ResNet} x {W8A8, W4A4} (per-channel weights): >= 81% of images
exact (W4A4 ResNet: all, max diff <= 5e-7), max diff / max quant error <= 0.72 (ViT W8A8 max
diff 0.031 on logits up to ~1.3), argmax agreement >= 98%.

ORT's own QDQ graph rewrites (on by default; they quantize each float Conv/Gemm bias to int32
at ``s_x s_w`` as an integer deployment would) change the function itself: mean diff up to
0.6x the quantization error on the W4A4 ResNet. The strict comparison therefore runs ORT with
``session.disable_quant_qdq=1`` (all other optimizations on); W8A8 is also checked with ORT's
defaults under the same max/argmax bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq.errors import HawqError
from hawq.quant import OpSetting, Plan, calibrate, quantize_, quantizers
from hawq.quant.onnx_export import export_onnx

from .cases import tiny_resnet, tiny_vit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL_EXACT = 1e-4
N_TEST = 256


def _randomize_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _fake_quant(arch: str, bits: int, method: str | None = None, **setting) -> torch.nn.Module:
    torch.manual_seed(1)
    model = tiny_vit() if arch == "vit" else tiny_resnet()
    _randomize_bn(model)
    model.eval()
    plan = Plan(OpSetting(w_bits=bits, a_bits=bits, granularity="per_channel", **setting))
    quantize_(model, plan, method, fold_bn=True)
    calibrate(model, [(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)])
    return model.eval()


def _session(path, qdq_rewrites: bool = False):
    so = ort.SessionOptions()
    if not qdq_rewrites:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _compare(qmodel: torch.nn.Module, sess, x: torch.Tensor) -> dict[str, float]:
    """ORT vs PyTorch fake-quant: max diff, fraction of images within ATOL_EXACT, argmax
    agreement; and the quantization error (fake-quant vs the same model with quantizers off)."""
    qs = quantizers(qmodel).values()
    with torch.no_grad():
        ref = qmodel(x).numpy()
        for q in qs:
            q.mode = "off"
        fp = qmodel(x).numpy()
        for q in qs:
            q.mode = "quant"
    out = sess.run(None, {"input": x.numpy()})[0]
    diff = np.abs(out - ref)
    return {"max": float(diff.max()), "quant_err": float(np.abs(ref - fp).max()),
            "exact_images": float((diff.max(axis=1) <= ATOL_EXACT).mean()),
            "agree": float((out.argmax(1) == ref.argmax(1)).mean())}  # fmt: skip


def _check(res: dict[str, float], exact: bool = True) -> None:
    ok = res["max"] <= res["quant_err"] and res["agree"] >= 0.97
    assert ok and (not exact or res["exact_images"] >= 0.75), res


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(N_TEST, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("bits", [8, 4])
def test_onnxruntime_matches_pytorch(arch, bits, images, tmp_path):
    qmodel = _fake_quant(arch, bits)
    path = export_onnx(qmodel, images[:2], tmp_path / "model.onnx")  # batch 2; runs at 256
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    kinds = [n.op_type for n in graph.graph.node]
    n_quantizers = 28 if arch == "vit" else 16  # 14 / 8 ops, two operands each
    assert kinds.count("QuantizeLinear") == kinds.count("DequantizeLinear") == n_quantizers
    _check(_compare(qmodel, _session(path), images))
    if bits == 8:  # ORT's default QDQ rewrites (int32 bias) stay within the bounds at 8 bits
        _check(_compare(qmodel, _session(path, qdq_rewrites=True), images), exact=False)


def test_sub_8bit_codes_stay_on_their_grid(images, tmp_path):
    """W4A4: every QuantizeLinear output (int8/uint8 storage) holds 4-bit codes only."""
    qmodel = _fake_quant("resnet", 4)
    graph = onnx.load(str(export_onnx(qmodel, images[:2], tmp_path / "m.onnx")))
    assert [n.op_type for n in graph.graph.node].count("Clip") == 8  # one per activation
    q_outs = [n.output[0] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in q_outs)
    onnx.save(graph, str(tmp_path / "codes.onnx"))
    outs = _session(tmp_path / "codes.onnx").run(q_outs, {"input": images[:32].numpy()})
    for name, codes in zip(q_outs, outs):
        lo, hi = (-8, 7) if codes.dtype == np.int8 else (0, 15)
        assert lo <= codes.min() and codes.max() <= hi, (name, codes.dtype, codes.min())
    assert {c.dtype for c in outs} == {np.dtype(np.int8), np.dtype(np.uint8)}


@pytest.mark.parametrize("method", ["lsq", "lsqplus", "pact"])
def test_learned_qparams_export(method, images, tmp_path):
    qmodel = _fake_quant("resnet", 4, method)
    with torch.no_grad():  # move the learned qparams off their calibrated init
        for name, p in qmodel.named_parameters():
            if name.endswith((".scale", ".alpha")):
                p.mul_(1.1)
            elif name.endswith(".offset"):
                p.add_(0.01)
    path = export_onnx(qmodel, images[:2], tmp_path / "m.onnx")
    _check(_compare(qmodel, _session(path), images[:64]))


@pytest.mark.parametrize(("setting", "match"), [
    ({"dynamic": True}, "dynamic ranges"),
    ({"w_format": "fp8_e4m3", "w_bits": 8}, "format 'fp8_e4m3'"),
    ({"w_format": "nf4", "w_bits": 4}, "format 'nf4'"),
    ({"granularity": "per_group", "group_size": 16}, "per-group"),
])  # fmt: skip
def test_unsupported_setting_is_one_clear_error(setting, match, images, tmp_path):
    torch.manual_seed(1)
    model = tiny_resnet().eval()
    s = {"w_bits": 8, "a_bits": 8, **setting}
    quantize_(model, Plan(OpSetting(**s)))
    calibrate(model, [(images[:16],)])
    with pytest.raises(HawqError, match=match) as e:
        export_onnx(model, images[:2], tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and "cannot export" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


def test_opset_below_13_is_refused(tmp_path):
    with pytest.raises(HawqError, match="opset 12"):
        export_onnx(_fake_quant("resnet", 8), torch.zeros(1, 3, 32, 32), tmp_path / "m.onnx", 12)


def test_export_stage_writes_onnx(make_cfg, tmp_path):
    from hawq.pipeline import run_pipeline

    cfg = make_cfg("experiment=smoke", "train.epochs=1", "data.train_subset=256",
                   "data.test_subset=128", "data.batch_size=64", "quant.calib_batches=1",
                   "quant.calib_batch_size=64", "stages=[train,ptq,export]", "device=cpu",
                   "integer.onnx=true")  # fmt: skip
    res = run_pipeline(cfg)["stages"]["export"]["onnx"]
    assert res["source"].endswith("ptq_model.pt") and (tmp_path / "run/export/model.onnx").is_file()
    assert res["ort_n"] == 64 and res["ort_argmax_agreement"] >= 95.0
    assert not (tmp_path / "run/export/integer.json").exists()  # no integer model in this run
