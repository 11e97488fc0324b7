"""Stage ``evaluate``: test accuracy and loss of the FP checkpoint.

Skipped when ``results.json`` already holds an evaluation of the same
checkpoint file (same modification time).
"""

from __future__ import annotations

from hawq.engine import evaluate
from hawq.stages.context import Context


def done(ctx: Context) -> bool:
    res = ctx.stage_result("evaluate")
    ckpt = ctx.checkpoint
    return bool(res) and ckpt.is_file() and res.get("checkpoint_mtime") == ckpt.stat().st_mtime


def run(ctx: Context) -> dict:
    model = ctx.load_fp_model()
    metrics = evaluate(model, ctx.data.eval_loader("test", ctx.device), ctx.device)
    return {
        "fp": metrics,
        "checkpoint": str(ctx.checkpoint),
        "checkpoint_mtime": ctx.checkpoint.stat().st_mtime,
    }
