"""Small helpers over ONNX graphs shared by :mod:`hawq.quant.onnx_export` and
:mod:`hawq.quant.onnx_int8`: who reads a name, which nodes consume it, the constant
values, and pruning what nothing reads any more. ``onnx`` is imported only when called
(the ``dev`` extra)."""

from __future__ import annotations

from typing import Any

import numpy as np


def constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            att = node.attribute[0]
            if att.name == "value":
                out[node.output[0]] = numpy_helper.to_array(att.t)
    return out


def consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def reads(node: Any) -> list[str]:
    """Names ``node`` reads, with those of its subgraphs (If/Loop bodies; a superset)."""
    names = list(node.input)
    for a in node.attribute:
        for g in [*([a.g] if a.HasField("g") else []), *a.graphs]:
            names += [name for n in g.node for name in reads(n)]
    return names


def prune(graph: Any) -> None:
    """Drop the nodes, initializers and value_info nothing reads any more."""
    live, alive = {o.name for o in graph.output}, []
    for node in reversed(graph.node):
        if live.intersection(node.output):
            alive.append(node)
            live.update(reads(node))
    del graph.node[:]
    graph.node.extend(reversed(alive))
    kept = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    made = live | {i.name for i in graph.input}
    kept = [v for v in graph.value_info if v.name in made]
    del graph.value_info[:]
    graph.value_info.extend(kept)
