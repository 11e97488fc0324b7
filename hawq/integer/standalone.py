"""Standalone reader of an exported integer model: needs only ``json`` and ``safetensors``.

Copy this file anywhere; it imports nothing from hawq or torch::

    from standalone import load
    model = load("runs/x/export")
    qkv = model.op("blocks.0.attn.qkv")     # {"kind", "w_bits", "weight": ndarray, ...}
    m, e = qkv["rq"]["m"], qkv["rq"]["e"]    # output scale multiplier m * 2^-e per channel

Arrays are numpy (``safetensors.numpy``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class IntegerExport:
    """The graph description and tensors of an export folder."""

    def __init__(self, doc: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.doc, self.tensors = doc, tensors
        self.nodes: dict[str, dict[str, Any]] = doc["nodes"]
        self.formats: dict[str, Any] = doc["formats"]

    def op(self, name: str) -> dict[str, Any]:
        """Node ``name`` (a quantized op's name, or an integer module's path) with its tensor
        keys resolved to arrays (and its ``rq`` child)."""
        name = self.doc.get("ops", {}).get(name, name)
        node = dict(self.nodes[name])
        for key in ("weight", "bias"):
            if key in node:
                node[key] = self.tensors[node[key]]
        if "tensors" in node:
            node["tensors"] = {k: self.tensors[v] for k, v in node["tensors"].items()}
        rq = self.nodes.get(f"{name}.rq")
        if rq is not None:
            node["rq"] = {k: self.tensors[v] for k, v in rq["tensors"].items()}
        return node


def load(folder: str | Path) -> IntegerExport:
    """Read ``integer.json`` and ``integer.safetensors`` from ``folder``."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    doc = json.loads((folder / "integer.json").read_text())
    return IntegerExport(doc, load_file(str(folder / "integer.safetensors")))
