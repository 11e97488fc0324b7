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

Weights are exported as int8/uint8 initializers read by DequantizeLinear (``weights="int8"``,
the default); their codes are checked against ``round(Q(W) / s) + z`` of the PyTorch quantizer,
and the float form (``weights="float"``: QuantizeLinear on the float weight in the graph) gives
ORT outputs equal bit for bit.
"""

from __future__ import annotations

import sys

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
INT8_UINT8 = {np.dtype(np.int8), np.dtype(np.uint8)}


def _randomize_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _fake_quant(arch: str, bits: int, method: str | None = None,
                granularity: str = "per_channel") -> torch.nn.Module:  # fmt: skip
    torch.manual_seed(1)
    model = tiny_vit() if arch == "vit" else tiny_resnet()
    _randomize_bn(model)
    model.eval()
    plan = Plan(OpSetting(w_bits=bits, a_bits=bits, granularity=granularity))
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


def _weight_codes(graph) -> dict[str, np.ndarray]:
    """The initializers that DequantizeLinear nodes read (the quantized weights), by name."""
    inits = {t.name: t for t in graph.graph.initializer}
    return {n.input[0]: onnx.numpy_helper.to_array(inits[n.input[0]]) for n in graph.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}  # fmt: skip


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
    n_quantizers, n_weights = (28, 10) if arch == "vit" else (16, 8)  # 14 / 8 ops, 2 operands
    codes = _weight_codes(graph)
    assert len(codes) == n_weights and {c.dtype for c in codes.values()} <= INT8_UINT8
    assert kinds.count("DequantizeLinear") == n_quantizers
    assert kinds.count("QuantizeLinear") == n_quantizers - n_weights  # activations only
    assert not {"Min", "Max"} & set(kinds)  # the per-channel weight clips went into the codes
    weights = {f"{n.removesuffix('.w_quant')}.weight" for n in quantizers(qmodel)}
    assert not weights & {t.name for t in graph.graph.initializer}  # no float weight is left
    _check(_compare(qmodel, _session(path), images))
    if bits == 8:  # ORT's default QDQ rewrites (int32 bias) stay within the bounds at 8 bits
        _check(_compare(qmodel, _session(path, qdq_rewrites=True), images), exact=False)


def test_sub_8bit_codes_stay_on_their_grid(images, tmp_path):
    """W4A4: every DequantizeLinear input (int8/uint8 codes, after the integer Clip that
    follows each QuantizeLinear) and weight initializer holds 4-bit codes."""
    qmodel = _fake_quant("resnet", 4)
    graph = onnx.load(str(export_onnx(qmodel, images[:2], tmp_path / "m.onnx")))
    kinds = [n.op_type for n in graph.graph.node]
    assert kinds.count("Clip") == 8  # one per activation, on the codes
    inits = {t.name for t in graph.graph.initializer}
    q_outs = [n.input[0] for n in graph.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] not in inits]  # fmt: skip
    graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in q_outs)
    onnx.save(graph, str(tmp_path / "codes.onnx"))
    outs = _session(tmp_path / "codes.onnx").run(q_outs, {"input": images[:32].numpy()})
    weights = _weight_codes(graph)
    for name, codes in [*zip(q_outs, outs), *weights.items()]:
        lo, hi = (-8, 7) if codes.dtype == np.int8 else (0, 15)
        assert lo <= codes.min() and codes.max() <= hi, (name, codes.dtype, codes.min())
    assert len(weights) == 8 and {c.dtype for c in [*outs, *weights.values()]} == INT8_UINT8


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


@pytest.mark.parametrize(("arch", "granularity", "layer", "name"), [
    ("vit", "per_channel", "blocks.0.attn.qkv", "blocks.0.attn.qkv.weight_quantized"),
    ("resnet", "per_tensor", "layer1.0.conv1", "layer1.0.conv1.w_quant_quantized"),  # BN folded
])  # fmt: skip
def test_weight_codes_are_the_pytorch_grid(arch, granularity, layer, name, images, tmp_path):
    """W4: the int8 initializer is ``round(Q(W) / s) + z`` of the PyTorch quantizer, and the
    per-tensor export matches PyTorch in ORT (per-channel: test_onnxruntime_matches_pytorch)."""
    qmodel = _fake_quant(arch, 4, granularity=granularity)
    op = qmodel.get_submodule(layer)
    q = op.w_quant
    with torch.no_grad():
        want = torch.round(op.quantized_weight() / q.scale) + q.zero_point
    path = export_onnx(qmodel, images[:2], tmp_path / "m.onnx")
    got = _weight_codes(onnx.load(str(path)))[name]
    assert got.dtype == np.int8 and np.array_equal(got.astype(np.float32), want.numpy())
    if granularity == "per_tensor":
        _check(_compare(qmodel, _session(path), images[:64]))


def test_float_weights_form_gives_the_same_outputs(images, tmp_path):
    """``weights="float"`` keeps QuantizeLinear on the float weights: same ORT outputs (bit for
    bit), a file > 2x larger (tiny ViT: 2.5x; the weights alone 4x)."""
    qmodel = _fake_quant("vit", 4)
    flt = export_onnx(qmodel, images[:2], tmp_path / "float.onnx", weights="float")
    int8 = export_onnx(qmodel, images[:2], tmp_path / "int8.onnx")
    kinds = [n.op_type for n in onnx.load(str(flt)).graph.node]
    assert kinds.count("QuantizeLinear") == 28 and not _weight_codes(onnx.load(str(flt)))
    assert flt.stat().st_size > 2 * int8.stat().st_size
    x = {"input": images[:64].numpy()}
    np.testing.assert_array_equal(_session(flt).run(None, x)[0], _session(int8).run(None, x)[0])


def test_weights_option_errors(monkeypatch, tmp_path):
    model, x = torch.nn.Linear(2, 2), torch.zeros(1, 2)
    with pytest.raises(HawqError, match="weights='int4': expected one of float, int8"):
        export_onnx(model, x, tmp_path / "m.onnx", weights="int4")
    monkeypatch.setitem(sys.modules, "onnx", None)  # onnx not installed
    with pytest.raises(HawqError, match="pip install onnx") as e:
        export_onnx(model, x, tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


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
    assert res["ort_float_argmax_agreement"] >= 95.0 and res["ort_integer_ops"] >= 1
    assert not (tmp_path / "run/export/integer.json").exists()  # no integer model in this run
