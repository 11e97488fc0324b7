"""Stage ``export``: the integer model as safetensors + JSON, and optionally the fake-quant
model as ONNX (QDQ).

Input: ``integer_model.pt`` (stage ``integer``). Output: ``export/integer.safetensors`` and
``export/integer.json``, readable with :mod:`hawq.integer.standalone` (json + safetensors
only, no training code). With ``integer.onnx: true`` also ``export/model.onnx``: the quantized
checkpoint the integer stage reads (``integer.source``, else ``qat_model.pt``, else
``ptq_model.pt``) in QDQ form, weights as int8 initializers (:mod:`hawq.quant.onnx_export`);
then the integer model is optional, and when onnxruntime is installed the file is run on one
test batch and compared with PyTorch: with ORT's default optimisations (the deployed form:
every quantized op on an integer kernel, see :mod:`hawq.quant.onnx_int8`; ``ort_*`` keys, and
``ort_integer_ops``: how many integer kernels the optimized graph holds), and with its QDQ
fusion off (all-float, the same function as the fake-quant model to float precision;
``ort_float_*`` keys).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

from hawq.batches import batch_size, run_inputs, sample_slice
from hawq.errors import HawqError
from hawq.integer.export import export
from hawq.integer.standalone import load
from hawq.io import load_torch
from hawq.models.ops import as_logits
from hawq.stages.context import Context
from hawq.stages.contract import (
    INTEGER_MODEL,
    PTQ_MODEL,
    QAT_MODEL,
    Contract,
    quantized_source,
    run_files,
)

DIR = "export"
ONNX = "model.onnx"


def _plan(ctx: Context) -> tuple[bool, bool]:
    """``(integer, onnx)``: which artifacts this run's export writes."""
    ic = ctx.group("integer")
    return ctx.path(INTEGER_MODEL).is_file() or not ic.onnx, ic.onnx


CONTRACT = Contract(("integer",), (run_files(INTEGER_MODEL, QAT_MODEL, PTQ_MODEL),))


def run(ctx: Context) -> dict[str, Any]:
    want_int, want_onnx = _plan(ctx)
    out: dict[str, Any] = {}
    if want_int:
        out.update(_export_integer(ctx))
    if want_onnx:
        out["onnx"] = _export_onnx(ctx)
    return out


def _export_integer(ctx: Context) -> dict[str, Any]:
    if not ctx.path(INTEGER_MODEL).is_file():
        raise HawqError(f"missing {ctx.path(INTEGER_MODEL)}; run the integer stage first")
    model = load_torch(ctx.path(INTEGER_MODEL))
    res = ctx.stage_result("integer") or {}
    if hasattr(model, "fp8_ops"):
        raise HawqError(
            f"{ctx.path(INTEGER_MODEL)} is an FP8 model (the integer stage took the fp8 path): "
            "export writes integer-only models; FP8 plans have no integer graph"
        )
    out = export(
        model, ctx.path(DIR), {"source": res.get("source"), "integer_acc": res.get("integer_acc")}
    )
    back = load(out)  # the standalone reader must accept what was written
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"dir": str(out), "nodes": len(back.nodes), "tensors": len(back.tensors), "bytes": size}


@torch.no_grad()
def _export_onnx(ctx: Context) -> dict[str, Any]:
    """Write ``export/model.onnx``; check it in onnxruntime on one test batch if installed."""
    from hawq.quant import load_quantized
    from hawq.quant.onnx_export import export_onnx

    src = quantized_source(ctx)
    qmodel, _plan_, _meta = load_quantized(src, "cpu")
    qmodel.eval()
    x = next(iter(ctx.data.eval_loader("test", "cpu", 64)))[0]
    n = batch_size(x)
    path = export_onnx(qmodel, sample_slice(x, 0, 1, n), ctx.path(DIR) / ONNX)
    res: dict[str, Any] = {"path": str(path), "source": str(src), "bytes": path.stat().st_size}
    if importlib.util.find_spec("onnxruntime") is None:
        return res
    import onnxruntime as ort

    ref = as_logits(run_inputs(qmodel, x))
    feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, Mapping) else {"input": x.numpy()}
    for prefix, integer in (("ort", True), ("ort_float", False)):
        so = ort.SessionOptions()
        if integer:
            so.optimized_model_filepath = str(ctx.path(DIR) / "model.ort_optimized.onnx")
        else:
            so.add_session_config_entry("session.disable_quant_qdq", "1")  # float Q/DQ math
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, feeds)[0])
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        res.update(
            {
                f"{prefix}_max_abs_diff": float((got - ref).abs().max()),
                f"{prefix}_argmax_agreement": 100.0 * agree,
            }
        )
    res["ort_n"] = n
    res["ort_integer_ops"] = _integer_ops(ctx.path(DIR) / "model.ort_optimized.onnx")
    return res


def _integer_ops(path: Any) -> int:
    """Number of integer-kernel nodes in ORT's optimized graph (0 without ``onnx``)."""
    if importlib.util.find_spec("onnx") is None:
        return 0
    import onnx

    kinds = {
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
    }
    return sum(n.op_type in kinds for n in onnx.load(str(path)).graph.node)
