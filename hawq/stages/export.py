"""Stage ``export``: the integer model as safetensors + JSON (scales, shifts, bits by op name).

Input: ``integer_model.pt`` (stage ``integer``). Output: ``export/integer.safetensors`` and
``export/integer.json``, readable with :mod:`hawq.integer.standalone` (json + safetensors
only, no training code).
"""

from __future__ import annotations

from typing import Any

from hawq.errors import HawqError
from hawq.integer.export import export
from hawq.integer.standalone import load
from hawq.io import load_torch
from hawq.stages.context import Context
from hawq.stages.integer import OUT

DIR = "export"


def done(ctx: Context) -> bool:
    return (ctx.path(DIR) / "integer.json").is_file()


def run(ctx: Context) -> dict[str, Any]:
    if not ctx.path(OUT).is_file():
        raise HawqError(f"missing {ctx.path(OUT)}; run the integer stage first")
    model = load_torch(ctx.path(OUT))
    res = ctx.stage_result("integer") or {}
    out = export(model, ctx.path(DIR), {"source": res.get("source"),
                                        "integer_acc": res.get("integer_acc")})  # fmt: skip
    back = load(out)  # the standalone reader must accept what was written
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"dir": str(out), "nodes": len(back.nodes), "tensors": len(back.tensors), "bytes": size}
