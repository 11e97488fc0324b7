"""Rewrite an exported QDQ graph into the forms ONNX Runtime runs on integer kernels.

ORT's QDQ transformer fuses ``DequantizeLinear -> MatMul/Conv [-> QuantizeLinear]`` into
``MatMulIntegerToFloat`` / ``QLinearMatMul`` / ``QLinearConv`` (int8 kernels, VNNI/AMX via
MLAS). Two patterns of :func:`~hawq.quant.onnx_export.export_onnx` blocked it:

* **b-bit grids** (``b < 8``, or PACT's ``[-127, 127]``) were written as
  ``Clip(x, lo_real, hi_real) -> Q -> DQ``: the float ``Clip`` in front of ``Q`` stops the
  fusion, so W4A4 ran entirely in float. :func:`integer_clips` moves the clip behind the
  quantizer, onto the codes: ``Q -> Clip(q_min, q_max) (int8/uint8) -> DQ``. With
  ``lo_real = (q_min - z) s`` the codes are the same, ``clip(round(x / s) + z, q_min, q_max)``
  (rounding is monotone and ``round(lo_real / s) + z = q_min`` exactly);
* **the classifier head** on a 2-D input was a ``Gemm`` (``transB = 1``), which ORT fuses
  only with a ``Q`` after it (logits have none), and a 2-D ``MatMul + Add`` ORT turns back
  into a ``Gemm`` before its QDQ fusion. :func:`gemm_to_matmul` writes it as
  ``Squeeze(MatMul(DQ(Q(Unsqueeze(x))), DQ(W^T)) + C)`` -- a 3-D product (``(B, 1, K)``),
  the int8 initializer transposed (per-channel axis 0 -> 1): the pattern of
  ``MatMulIntegerToFloat``. Same values: only shapes change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hawq.quant.onnx_graph import constants, consumers, prune


def integer_clips(model: Any) -> int:
    """``Clip(float) -> Q`` (per tensor) becomes ``Q -> Clip(codes)``; returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    const, users = constants(graph), consumers(graph)
    done = 0
    for clip in [n for n in graph.node if n.op_type == "Clip" and len(n.input) == 3]:
        nxt = users.get(clip.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "QuantizeLinear":
            continue
        q = nxt[0]
        lo_r, hi_r = const.get(clip.input[1]), const.get(clip.input[2])
        s, z = const.get(q.input[1]), const.get(q.input[2]) if len(q.input) > 2 else None
        if lo_r is None or hi_r is None or s is None or z is None or s.size != 1:
            continue
        info = np.iinfo(z.dtype)
        codes = [
            np.clip(np.round(np.float32(v) / np.float32(s)) + int(z), info.min, info.max)
            for v in (lo_r, hi_r)
        ]
        names = [f"{clip.name}_code_{k}" for k in ("lo", "hi")]
        for name, c in zip(names, codes, strict=True):
            graph.initializer.append(numpy_helper.from_array(np.array(c, dtype=z.dtype), name))
        raw = f"{q.output[0]}_unclipped"
        new = helper.make_node("Clip", [raw, *names], [q.output[0]], name=f"{clip.name}_codes")
        q.input[0] = clip.input[0]
        q.output[0] = raw
        idx = list(graph.node).index(q)
        graph.node.insert(idx + 1, new)
        graph.node.remove(clip)
        done += 1
    return done


def gemm_to_matmul(model: Any) -> int:
    """``Gemm(A, DQ(W), C, transB=1)`` on an int8 initializer ``W`` becomes
    ``Add(MatMul(A, DQ(W^T)), C)``; returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users = consumers(graph)
    done = 0
    for gemm in [n for n in graph.node if n.op_type == "Gemm"]:
        att = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (
            att.get("transA", 0)
            or not att.get("transB", 0)
            or att.get("alpha", 1.0) != 1.0
            or att.get("beta", 1.0) != 1.0
        ):
            continue
        dq = producer.get(gemm.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if len(users.get(dq.output[0], [])) != 1:
            continue
        if _quantizer(gemm.input[0], producer, users) is None:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.ndim != 2:
            continue
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), f"{dq.input[0]}_t")
        graph.initializer.append(wt)
        dq.input[0] = wt.name
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1 - (a.i % 2)
        axes = f"{gemm.name}_axis1"
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
        _unsqueeze_activation(graph, _quantizer(gemm.input[0], producer, users), axes)
        mm_out, add_out = f"{gemm.output[0]}_matmul", f"{gemm.output[0]}_3d"
        nodes = [
            helper.make_node(
                "MatMul", [gemm.input[0], dq.output[0]], [mm_out], name=f"{gemm.name}_matmul"
            )
        ]
        if len(gemm.input) > 2 and gemm.input[2]:
            nodes.append(
                helper.make_node(
                    "Add", [mm_out, gemm.input[2]], [add_out], name=f"{gemm.name}_bias"
                )
            )
        else:
            add_out = mm_out
        nodes.append(
            helper.make_node(
                "Squeeze", [add_out, axes], [gemm.output[0]], name=f"{gemm.name}_squeeze"
            )
        )
        idx = list(graph.node).index(gemm)
        for k, node in enumerate(nodes):
            graph.node.insert(idx + k, node)
        graph.node.remove(gemm)
        done += 1
    return done


def _unsqueeze_activation(graph: Any, q: Any, axes: str) -> None:
    """Make the output of quantizer ``q`` 3-D by unsqueezing its input ``x`` in front of it
    (so that the Q/DQ pair stays adjacent)."""
    from onnx import helper

    src = q.input[0]  # checked by _qdq_input
    out = f"{src}_unsqueezed"
    q.input[0] = out
    idx = list(graph.node).index(q)
    graph.node.insert(idx, helper.make_node("Unsqueeze", [src, axes], [out], name=f"{out}_node"))


def _quantizer(a: str, producer: dict, users: dict) -> Any:
    """The ``Q`` of ``a = DQ([Clip(codes)] Q(x))`` when every link has one consumer, else None."""
    dq = producer.get(a)
    if dq is None or dq.op_type != "DequantizeLinear" or len(users.get(a, [])) != 1:
        return None
    node = producer.get(dq.input[0])
    if node is not None and node.op_type == "Clip" and len(users[node.output[0]]) == 1:
        node = producer.get(node.input[0])  # the codes' clip of a b-bit grid
    if node is None or node.op_type != "QuantizeLinear" or len(users[node.output[0]]) != 1:
        return None
    return node


def ort_int8_form(model: Any) -> Any:
    """Both rewrites, in place (dropping constants left unused); returns ``model``."""
    integer_clips(model)
    gemm_to_matmul(model)
    prune(model.graph)
    return model
