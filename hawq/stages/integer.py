"""Stage ``integer``: convert the quantized model to the integer-only graph and evaluate it.

Inputs: a quantized checkpoint (``integer.source``, else the run's ``qat_model.pt``, else
``ptq_model.pt``). Outputs: ``integer_model.pt`` (the integer module) and metrics: test
accuracy of the fake-quant model and of the integer model, their gap and the argmax
agreement between the two on every test image.

An FP8 plan (an op with fp8 weight and activation formats) takes the fp8 path instead:
:func:`hawq.integer.fp8.convert_fp8` (float8 codes, ``torch._scaled_mm``); the metrics say
which (``path``: ``integer`` or ``fp8``) and, for fp8, how many ops run on fp8 codes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hawq.batches import run_inputs
from hawq.integer import ops
from hawq.integer.convert import convert
from hawq.integer.fp8 import convert_fp8, has_fp8_ops
from hawq.io import save_torch
from hawq.models.ops import as_logits
from hawq.quant import load_quantized
from hawq.stages.context import Context
from hawq.stages.contract import (
    INTEGER_MODEL,
    PTQ_MODEL,
    QAT_MODEL,
    Contract,
    configured,
    quantized_source,
    run_files,
)

log = logging.getLogger("hawq")
OUT = INTEGER_MODEL


@torch.no_grad()
def compare(qmodel: nn.Module, imodel: nn.Module, batches, device: torch.device) -> dict:
    """Accuracy of both models and their argmax agreement (percent) over ``batches``."""
    n = agree = ok_q = ok_i = 0
    for x, y in batches:
        pq = as_logits(run_inputs(qmodel, x)).argmax(-1)
        pi = run_inputs(imodel, x).argmax(-1)
        n += y.numel()
        agree += int((pq == pi).sum())
        ok_q += int((pq == y).sum())
        ok_i += int((pi == y).sum())
    pct = lambda k: 100.0 * k / max(n, 1)  # noqa: E731
    return {"n": n, "fake_quant_acc": pct(ok_q), "integer_acc": pct(ok_i), "agreement": pct(agree)}


CONTRACT = Contract(
    ("data", "integer"),
    (configured("integer.source", QAT_MODEL), run_files(QAT_MODEL, PTQ_MODEL)),
)


def run(ctx: Context) -> dict[str, Any]:
    ic = ctx.group("integer")
    ops.set_backend(ic.backend)
    src = quantized_source(ctx)
    qmodel, plan, _meta = load_quantized(src, ctx.device)
    qmodel.eval()
    path = "fp8" if has_fp8_ops(qmodel) else "integer"
    if path == "fp8":
        imodel = convert_fp8(qmodel).to(ctx.device)
        extra = {"fp8_ops": len(imodel.fp8_ops), "fake_quant_ops": len(imodel.fake_quant_ops)}
    else:
        calib = ctx.data.eval_loader("train", ctx.device, ic.calib_batch_size)
        imodel = convert(
            qmodel,
            calib,
            ic.residual_bits,
            ic.pack_int4,
            ic.calib_batches,
            ic.margin,
            float_islands=ic.float_islands,
        ).to(ctx.device)
        extra = {
            "residual_bits": ic.residual_bits,
            "float_ops": imodel.float_ops,
            "integer_only": not imodel.float_ops,
        }
    kernels = ops.kernel_report(ctx.device)
    log.info(
        "integer: backend %s (%s), %s, GEMM %s",
        kernels["resolved"],
        kernels["requested"],
        kernels["isa"]["family_used"],
        kernels.get("gemm", "-"),
    )
    res = compare(qmodel, imodel, ctx.data.eval_loader("test", ctx.device), ctx.device)
    save_torch(ctx.path(OUT), imodel.cpu())
    log.info(
        "integer (%s path): fake-quant acc %.2f, integer acc %.2f, argmax agreement %.2f%%",
        path,
        res["fake_quant_acc"],
        res["integer_acc"],
        res["agreement"],
    )
    return {
        **res,
        **extra,
        "acc_gap": res["fake_quant_acc"] - res["integer_acc"],
        "path": path,
        "source": str(src),
        "backend": ops.get_backend(),
        "kernels": kernels,
        "model": type(imodel).__name__,
        "checkpoint": str(ctx.path(OUT)),
    }
