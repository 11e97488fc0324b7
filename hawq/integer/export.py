"""Export an integer model as ``integer.safetensors`` + ``integer.json``.

The safetensors file holds every integer tensor of the model under its step's path
(``blocks_0_attn_qkv.layer.weight``, ``blocks_0_attn_qkv.layer.rq.m`` ...). The JSON
describes the model without any Python class: per integer module (keyed by path) its kind,
bits, the tensor keys of its weights, int32 bias and dyadic requantizer (``m``, ``e``:
scale = m 2^-e; ``z``, ``lo``, ``hi``), the real scales it was built from, and the integer
constants of the nonlinear kernels; the graph between the steps (``graph``: node name, the
step it calls, its inputs, the model op it implements); and the model-level formats (input
grid, residual scale and bits, logit scale); ``ops`` maps each quantized op's name to its
integer layer. :mod:`hawq.integer.standalone` reads both with ``json`` and ``safetensors``
only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.integer.gelu import IntGELU
from hawq.integer.graph import steps
from hawq.integer.layernorm import IntLayerNorm
from hawq.integer.layers import IntConv2d, IntLinear, IntMatMul, IntRequant
from hawq.integer.softmax import IntSoftmax
from hawq.io import write_bytes, write_text

SCHEMA = 1


def _node(name: str, m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, IntLinear):
        d: dict[str, Any] = {
            "kind": "conv2d" if isinstance(m, IntConv2d) else "linear",
            "w_bits": m.w_bits,
            "k": m.k,
            "packed_int4": m.weight.dtype == torch.uint8,
            "weight": f"{name}.weight",
            "bias": f"{name}.bias",
            "acc_scale": m.acc_scale.tolist(),
        }
        if isinstance(m, IntConv2d):
            d.update(shape=list(m.shape), stride=m.stride, padding=m.padding, pad_value=m.pad_value)
    elif isinstance(m, IntMatMul):
        d = {"kind": "matmul", "za": m.za, "zb": m.zb, "acc_scale": m.acc_scale}
    elif isinstance(m, IntSoftmax):
        d = {
            "kind": "softmax",
            "in_scale": m.scale,
            "shift": m.shift,
            "out_bits": m.out_bits,
            "q_ln2": int(m.q_ln2),
            "exp_table": f"{name}.exp_table",
        }
    elif isinstance(m, IntGELU):
        d = {
            "kind": "gelu",
            "in_scale": m.scale,
            "out_scale": m.out_scale,
            "t": m.t,
            "q_b": int(m.q_b),
            "q_1": int(m.q_1),
        }
    elif isinstance(m, IntLayerNorm):
        d = {
            "kind": "layernorm",
            "dim": m.dim,
            "f": m.f,
            "t": m.t,
            "k": m.k,
            "in_scale": m.in_scale,
            "out_scale": m.out_scale,
            "lo": m.out_lo,
            "hi": m.out_hi,
            "eps_q": int(m.eps_q),
            "tensors": {k: f"{name}.{k}" for k in ("m", "e", "b", "z")},
        }
    elif isinstance(m, IntRequant):
        d = {
            "kind": "requant",
            "out_dtype": str(m.out_dtype).replace("torch.", ""),
            "tensors": {k: f"{name}.{k}" for k in ("m", "e", "z", "lo", "hi")},
        }
    else:
        return _step(name, m)
    return d


def _step(name: str, m: nn.Module) -> dict[str, Any] | None:
    """The graph steps (:mod:`hawq.integer.graph.steps`) around the layers above."""
    kind = type(m).__name__
    if kind == "Linear" and isinstance(m, steps.Linear):
        return {
            "kind": "linear_epilogue",
            "layer": f"{name}.layer",
            "limit": m.limit,
            "table": f"{name}.lut" if m.lut is not None else None,
            "table_index": f"requant output - {name}.layer.rq.lo",
        }
    if isinstance(m, steps.Conv):
        return {"kind": "conv_epilogue", "layer": f"{name}.layer", "limit": m.limit, "relu": m.relu}
    if isinstance(m, steps.Lookup):
        return {"kind": "table", "table": f"{name}.table", "index": f"input - {m.lo}"}
    if isinstance(m, steps.Requant):
        return {
            "kind": "requant_step",
            "rq": f"{name}.rq",
            "zero_in": m.zero_in,
            "channel_dim": m.channel_dim,
        }
    if isinstance(m, steps.ResidualAdd):
        return {"kind": "residual_add", "limit": m.limit, "relu": m.relu}
    if isinstance(m, steps.Clamp):
        return {"kind": "clamp", "lo": m.lo, "hi": m.hi}
    if isinstance(m, steps.Mean):
        return {"kind": "mean", "dims": list(m.dims), "keepdim": m.keepdim}
    if isinstance(m, steps.Attention):
        return {
            "kind": "attention",
            "qkv": f"{name}.qkv",
            "heads": m.heads,
            "zq": m.zq,
            "zk": m.zk,
            "zv": m.zv,
            "zp": m.zp,
            "softmax": f"{name}.softmax",
            "p_rq": f"{name}.p_rq",
            "out_rq": f"{name}.out_rq",
        }
    if isinstance(m, steps.Softmax):
        return {"kind": "softmax_step", "softmax": f"{name}.softmax", "rq": f"{name}.rq"}
    return None


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON document of :func:`export`: ``nodes`` (every integer module keyed by its
    path), ``graph`` (the dataflow between the steps, by node name, each naming the model
    op it implements) and ``formats``."""
    root = model.steps if hasattr(model, "steps") else model
    nodes = {n: d for n, m in root.named_modules() if (d := _node(n, m)) is not None}
    fmt = {
        "model": type(model).__name__,
        "in_grid": None if model.in_grid is None else model.in_grid.as_dict(),  # None: ids
        "residual_scale": model.s_r,
        "residual_limit": model.limit,
        "logit_scale": model.logit_scale,
    }
    doc = {"schema": SCHEMA, "formats": fmt, "nodes": nodes}
    if hasattr(model, "describe"):
        doc["graph"] = model.describe()["graph"]
        doc["ops"] = dict(model.op_paths)
    return doc


def export(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``integer.safetensors`` and ``integer.json`` into ``out_dir`` (atomically)."""
    from safetensors.torch import save

    out = Path(out_dir)
    root = model.steps if hasattr(model, "steps") else model
    tensors = {k: v.detach().cpu().contiguous() for k, v in root.state_dict().items()}
    write_bytes(out / "integer.safetensors", save(tensors))
    doc = describe(model)
    doc["meta"] = meta or {}
    write_text(out / "integer.json", json.dumps(doc, indent=1) + "\n")
    return out
