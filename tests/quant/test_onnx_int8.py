"""The exported QDQ file runs on ORT's integer kernels with default optimisations: every
quantized matmul/linear (the head included, W4A4 included) becomes ``MatMulIntegerToFloat`` /
``QLinearMatMul`` in ORT's optimized graph (read back from ``optimized_model_filepath``), no
float ``MatMul``/``Gemm``/``DequantizeLinear`` is left; the rewrites leave outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq.quant import OpSetting, Plan, calibrate, quantize_
from hawq.quant.onnx_export import export_onnx

from .cases import tiny_vit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger"}
FLOAT_GEMMS = {"MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "FusedGemm"}


def _vit(bits: int) -> torch.nn.Module:
    torch.manual_seed(1)
    model = tiny_vit().eval()
    quantize_(model, Plan(OpSetting(w_bits=bits, a_bits=bits)), None, fold_bn=True)
    calibrate(model, [(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)])
    return model.eval()


def _optimized(path, tmp_path, disable_qdq: bool = False):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    if disable_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("bits", [8, 4, 6])
def test_every_quantized_op_runs_on_integer_kernels(bits, tmp_path):
    q = _vit(bits)
    path = export_onnx(q, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    sess, kinds = _optimized(path, tmp_path)
    depth = len(q.blocks)
    n_linear = 1 + 4 * depth + 1  # patch embed, qkv/proj/fc1/fc2 per block, head
    n_matmul = 2 * depth  # q @ k^T, attn @ v
    assert sum(k in INTEGER_OPS for k in kinds) == n_linear + n_matmul, kinds
    assert not FLOAT_GEMMS & set(kinds), kinds
    assert "DequantizeLinear" not in kinds  # every DQ was fused into an integer op
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = q(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9  # defaults: int32 bias, fused GELU


@pytest.mark.parametrize("bits", [8, 4])
def test_rewrites_keep_the_fake_quant_function(bits, tmp_path):
    """With ORT's QDQ fusion off the file is the fake-quant model to float precision: the
    integer clips and the 3-D head change no value."""
    q = _vit(bits)
    path = export_onnx(q, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    sess, _ = _optimized(path, tmp_path, disable_qdq=True)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = q(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    exact = (np.abs(out - ref).max(axis=1) <= 1e-4).mean()
    assert exact >= 0.75 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
