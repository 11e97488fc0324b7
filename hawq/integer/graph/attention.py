"""Fuse the fused-QKV attention pattern into one :class:`~hawq.integer.graph.steps.Attention`.

The pattern (hawq's ViT, timm, most ViT code)::

    qkv = linear(h).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    out = matmul(softmax(matmul(q, k.transpose(-2, -1)) * c), v).transpose(1, 2).reshape(B, T, D)

with every intermediate read once. ``ops.int_attention`` computes exactly the integers of
the unfused steps (the qkv columns requantised onto the q / k / v grids, integer softmax,
its requantisation, the second product requantised onto ``out``'s consumer grid), in
one pass over the heads (on the CPU backend: register-tiled products, nothing but the
operands written in head layout).
"""

from __future__ import annotations

import torch
from torch import fx

from hawq.integer.graph import steps
from hawq.integer.graph.analyze import tensor_args
from hawq.integer.graph.lower import Lowering, codes
from hawq.integer.graph.trace import module_name
from hawq.integer.layers import IntLinear, IntRequant
from hawq.integer.softmax import IntSoftmax


def _one_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _method(node, names: tuple[str, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _args_are(node: fx.Node, values: tuple) -> bool:
    return tuple(node.args[1:]) == values


def _qop(lo: Lowering, node, kind: str) -> bool:
    return (
        isinstance(node, fx.Node)
        and lo.an.role.get(node) == "qop"
        and type(lo.gm.get_submodule(str(node.target))).__name__ == kind
    )


def match(lo: Lowering, node: fx.Node) -> dict | None:
    """The pattern's nodes when ``node`` is its final reshape, else None."""
    if not lo.fuse or not _method(node, ("reshape", "view")):
        return None
    t = node.args[0]
    if not (_method(t, ("transpose",)) and _args_are(t, (1, 2)) and _one_user(t) is node):
        return None
    av = t.args[0]
    if not (_qop(lo, av, "QuantMatMul") and _one_user(av) is t):
        return None
    soft, v = av.args[0], av.args[1]
    if lo.an.role.get(soft) != "softmax" or _one_user(soft) is not av:
        return None
    scaled = tensor_args(soft)[0]
    try:
        qk, relu, mult = lo.chain(scaled)
    except Exception:  # noqa: BLE001 - not an accumulator chain: no match
        return None
    if relu or not _qop(lo, qk, "QuantMatMul") or _one_user(scaled) is not soft:
        return None
    q, kt = qk.args[0], qk.args[1]
    if not (_method(kt, ("transpose",)) and _args_are(kt, (-2, -1))):
        return None
    k = kt.args[0]
    parts = [q, k, v]
    if not all(
        p.op == "call_function" and p.args[1] == i and _one_user(p) is not None
        for i, p in enumerate(parts)
    ):
        return None
    perm = q.args[0]
    if any(p.args[0] is not perm for p in parts) or len(perm.users) != 3:
        return None
    if not (_method(perm, ("permute",)) and _args_are(perm, (2, 0, 3, 1, 4))):
        return None
    resh = perm.args[0]
    if not (_method(resh, ("reshape", "view")) and _one_user(resh) is perm):
        return None
    qkv = resh.args[0]
    shape = resh.meta["value"].shape
    if not (
        _qop(lo, qkv, "QuantLinear")
        and _one_user(qkv) is resh
        and len(shape) == 5
        and shape[2] == 3
    ):
        return None
    return {"qkv": qkv, "qk": qk, "av": av, "mult": mult, "heads": int(shape[3])}


def fused(lo: Lowering, m: dict, demand: tuple) -> fx.Node:
    """The :class:`~hawq.integer.graph.steps.Attention` step of a match, onto ``demand``."""
    qkv = lo.spec(m["qkv"])
    qk, av = lo.spec(m["qk"]), lo.spec(m["av"])
    d = qkv.codes.shape[0] // 3
    grids = [qk.a] * d + [qk.b] * d + [av.b] * d  # per output column: q, k, v
    tgt = torch.tensor([g.scale for g in grids], dtype=torch.float64)

    def col(key: str) -> torch.Tensor:
        return torch.tensor([getattr(g, key) for g in grids])

    rq = IntRequant(qkv.act.scale * qkv.scale / tgt, col("zero"), col("lo"), col("hi"))
    sm = IntSoftmax(qk.a.scale * qk.b.scale * m["mult"])
    p_rq = IntRequant.to_grid(sm.out_scale, av.a)
    out_rq = IntRequant.to_grid(av.a.scale * av.b.scale, demand[1])
    step = steps.Attention(
        IntLinear(qkv, rq, lo.pack_int4),
        m["heads"],
        qk.a.zero,
        qk.b.zero,
        av.b.zero,
        av.a.zero,
        sm,
        p_rq,
        out_rq,
    )
    h = lo.emit(tensor_args(m["qkv"])[0], codes(qkv.act))
    name = module_name(m["qkv"]).rsplit(".", 1)[0] or "attention"
    node = lo.add_step(step, (h,), f"{name}.attention", name)
    lo.op_paths[module_name(m["qkv"])] = f"{node.target}.qkv"
    for key in ("qk", "av"):
        lo.op_paths[module_name(m[key])] = str(node.target)
    return node
