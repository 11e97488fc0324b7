"""Export an integer model as ``integer.safetensors`` + ``integer.json``.

The safetensors file holds every integer tensor of the model under its module path
(``blocks.0.attn.qkv.weight``, ``blocks.0.attn.qkv.rq.m`` ...). The JSON describes the graph
without any Python class: per node (keyed by module name) its kind, bits, the tensor keys
of its weights, int32 bias and dyadic requantizer (``m``, ``e``: scale = m 2^-e; ``z``,
``lo``, ``hi``), the real scales it was built from, and the integer constants of the
nonlinear kernels; plus the model-level formats (input grid, residual scale and bits,
logit scale). :mod:`hawq.integer.standalone` reads both with ``json`` and ``safetensors``
only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.integer.gelu import IntGELU
from hawq.integer.layernorm import IntLayerNorm
from hawq.integer.layers import IntConv2d, IntLinear, IntMatMul, IntRequant
from hawq.integer.softmax import IntSoftmax
from hawq.io import write_bytes, write_text

SCHEMA = 1


def _node(name: str, m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, IntLinear):
        d: dict[str, Any] = {"kind": "conv2d" if isinstance(m, IntConv2d) else "linear",
                             "w_bits": m.w_bits, "k": m.k,
                             "packed_int4": m.weight.dtype == torch.uint8,
                             "weight": f"{name}.weight", "bias": f"{name}.bias",
                             "acc_scale": m.acc_scale.tolist()}  # fmt: skip
        if isinstance(m, IntConv2d):
            d.update(shape=list(m.shape), stride=m.stride, padding=m.padding,
                     pad_value=m.pad_value)  # fmt: skip
    elif isinstance(m, IntMatMul):
        d = {"kind": "matmul", "za": m.za, "zb": m.zb, "acc_scale": m.acc_scale}
    elif isinstance(m, IntSoftmax):
        d = {"kind": "softmax", "in_scale": m.scale, "shift": m.shift, "out_bits": m.out_bits,
             "q_ln2": int(m.q_ln2), "exp_table": f"{name}.exp_table"}  # fmt: skip
    elif isinstance(m, IntGELU):
        d = {"kind": "gelu", "in_scale": m.scale, "out_scale": m.out_scale, "t": m.t,
             "q_b": int(m.q_b), "q_1": int(m.q_1)}  # fmt: skip
    elif isinstance(m, IntLayerNorm):
        d = {"kind": "layernorm", "dim": m.dim, "f": m.f, "t": m.t, "k": m.k,
             "in_scale": m.in_scale,
             "out_scale": m.out_scale, "lo": m.out_lo, "hi": m.out_hi, "eps_q": int(m.eps_q),
             "tensors": {k: f"{name}.{k}" for k in ("m", "e", "b", "z")}}  # fmt: skip
    elif isinstance(getattr(m, "gelu", None), torch.Tensor):  # the ViT MLP's GELU table
        d = {"kind": "gelu_table", "table": f"{name}.gelu",
             "index": f"fc1 output code - {name}.fc1.rq.lo"}  # fmt: skip
    elif isinstance(m, IntRequant):
        d = {"kind": "requant", "out_dtype": str(m.out_dtype).replace("torch.", ""),
             "tensors": {k: f"{name}.{k}" for k in ("m", "e", "z", "lo", "hi")}}  # fmt: skip
    else:
        return None
    return d


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON document of :func:`export` (graph description keyed by module name)."""
    nodes = {n: d for n, m in model.named_modules() if (d := _node(n, m)) is not None}
    fmt = {"model": type(model).__name__, "in_grid": model.in_grid.as_dict(),
           "residual_scale": model.s_r, "residual_limit": model.limit,
           "logit_scale": model.logit_scale}  # fmt: skip
    if hasattr(model, "patch_size"):
        fmt["patch_size"] = model.patch_size
        fmt["heads"] = model.blocks[0].attn.heads if len(model.blocks) else None
    return {"schema": SCHEMA, "formats": fmt, "nodes": nodes}


def export(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``integer.safetensors`` and ``integer.json`` into ``out_dir`` (atomically)."""
    from safetensors.torch import save

    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(out / "integer.safetensors", save(tensors))
    doc = describe(model)
    doc["meta"] = meta or {}
    write_text(out / "integer.json", json.dumps(doc, indent=1) + "\n")
    return out
