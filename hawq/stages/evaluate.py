"""Stage ``evaluate``: test accuracy and loss of the FP checkpoint.

Skipped when its completion record matches: the same checkpoint (by content hash)
and the same ``data`` config.
"""

from __future__ import annotations

from hawq.engine import evaluate
from hawq.stages.context import Context
from hawq.stages.contract import Contract, checkpoint

CONTRACT = Contract(("data",), (checkpoint,))


def run(ctx: Context) -> dict:
    model = ctx.load_fp_model()
    metrics = evaluate(model, ctx.data.eval_loader("test", ctx.device), ctx.device)
    return {
        "fp": metrics,
        "checkpoint": str(ctx.checkpoint),
    }
