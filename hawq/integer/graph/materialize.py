"""Materialise the residual stream, LayerNorm, GELU and softmax values of a lowering
(:class:`~hawq.integer.graph.lower.Lowering`), with the epilogue fusions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from hawq.integer.gelu import pointwise_table
from hawq.integer.graph import steps
from hawq.integer.graph.analyze import (
    IDENTITY_MODULES,
    Unsupported,
    table_function,
    tensor_args,
    where,
)
from hawq.integer.graph.lower import ACC_D, GELU_BITS, INDEX_D, LOGITS_D, WIDE_D, Lowering
from hawq.integer.graph.trace import module_name
from hawq.integer.layernorm import IntLayerNorm
from hawq.integer.layers import LOGIT_BITS, IntRequant
from hawq.integer.softmax import IntSoftmax


def value(lo: Lowering, node: fx.Node, kind: str, demand: tuple) -> fx.Node:
    """``node`` (a wide, norm, gelu or softmax value) in format ``demand``."""
    if kind == "wide":
        if demand == WIDE_D:
            return _wide(lo, node)
        return from_wide(lo, lo.emit(node, WIDE_D), demand, node)
    if kind == "norm":
        return _norm(lo, node, demand)
    if kind == "gelu":
        return _gelu(lo, node, demand)
    if kind == "softmax":
        return _softmax(lo, node, demand)
    raise Unsupported(f"integer conversion: {where(node)} ({kind}) is read as {demand[0]}")


def from_wide(lo: Lowering, wide: fx.Node, demand: tuple, node: fx.Node) -> fx.Node:
    """A residual-stream value requantised onto ``demand`` (per tensor)."""
    if demand == ACC_D:
        raise Unsupported(f"integer conversion: {where(node)} feeds softmax from the stream")
    rq = lo.requant_to(torch.tensor(lo.r.s_r, dtype=torch.float64), demand, relu=False)
    dim = 1 if node.meta["value"].dim() == 4 else -1  # NCHW: requant channels-last (the
    # layout the conv kernels read)
    return lo.add_step(steps.Requant(rq, 0, dim), (wide,), f"{node.name}.rq", node.name)


def _fusable_acc(lo: Lowering, node: fx.Node, consumer: fx.Node) -> fx.Node | None:
    """The accumulator-chain end behind ``node`` when ``consumer`` is its only reader, the
    stream its only format and only identities (dropout) lie between: its requantisation
    can then run in the op's epilogue, fused with the add."""
    if not lo.fuse or lo.an.kind.get(node) != "acc" or list(node.users) != [consumer]:
        return None
    end = node
    while end not in lo.an.role:
        if not isinstance(_module(lo, end), IDENTITY_MODULES):
            return None
        end = tensor_args(end)[0]
        if len(end.users) != 1:
            return None
    return end if lo.demands(end) == [WIDE_D] else None


def _module(lo: Lowering, node: fx.Node):
    return lo.gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _wide(lo: Lowering, node: fx.Node) -> fx.Node:
    r = lo.an.role[node]
    name = node.name
    if r == "add":
        a, b = tensor_args(node)
        relu = _only_relu_user(lo, node)
        for x, y in ((b, a), (a, b)):  # fuse the add into the producer's epilogue
            end = _fusable_acc(lo, x, node)
            if end is not None:
                op, x_relu, mult = lo.chain(end)
                if x_relu:
                    continue
                spec = lo.spec(op)
                if getattr(spec, "kind", None) not in ("linear", "conv2d") or (
                    relu and spec.kind != "conv2d"
                ):
                    continue
                rq = lo.requant_to(lo.acc_scale(op, mult), WIDE_D, False)
                return lo.op_step(op, rq, lo.emit(y, WIDE_D), lo.r.limit, relu)
        return lo.add_step(
            steps.ResidualAdd(lo.r.limit, relu),
            (lo.emit(a, WIDE_D), lo.emit(b, WIDE_D)),
            f"{name}",
            name,
        )
    if r == "relu":
        src = tensor_args(node)[0]
        if lo.an.role.get(src) == "add" and _only_relu_user(lo, src):
            return lo.emit(src, WIDE_D)  # the add already clamps to [0, limit]
        return lo.add_step(steps.Clamp(0, lo.r.limit), (lo.emit(src, WIDE_D),), name, name)
    if r == "cat":
        return lo.graph.node_copy(
            node, lambda a: lo.emit(a, WIDE_D) if a in tensor_args(node) else lo.arg(a)
        )
    if r == "mean":
        return _mean(lo, node)
    if r == "embed":
        return embedding(lo, node, WIDE_D)
    raise Unsupported(f"integer conversion: {where(node)} cannot join the residual stream")


def embedding(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    """An embedding lookup: its table quantised onto the stream (``WIDE_D``) or a grid."""
    if node.op == "call_module":
        m = lo.gm.get_submodule(str(node.target))
        if m.max_norm is not None:
            raise Unsupported(f"integer conversion: {where(node)}: max_norm renormalises rows")
        table, ids = m.weight, tensor_args(node)[0]
    else:
        ids, table = tensor_args(node)[:2]
        if node.kwargs.get("max_norm") is not None:
            raise Unsupported(f"integer conversion: {where(node)}: max_norm renormalises rows")
        table = table.meta["value"]
    t = table.detach().double().cpu()
    if demand == WIDE_D:
        q = torch.clamp(torch.round(t / lo.r.s_r), -lo.r.limit, lo.r.limit).to(torch.int32)
    else:
        q = demand[1].quantize(t.float())
    name = module_name(node) if node.op == "call_module" else node.name
    return lo.add_step(steps.Lookup(q, 0), (lo.emit(ids, INDEX_D),), name, name)


def _only_relu_user(lo: Lowering, node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and lo.an.role.get(users[0]) == "relu"


def _mean(lo: Lowering, node: fx.Node) -> fx.Node:
    x = tensor_args(node)[0]
    pools = (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d)
    if node.op == "call_module" or node.target in pools:
        m = lo.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        size = m.output_size if m is not None else node.args[1]
        one_d = isinstance(m, torch.nn.AdaptiveAvgPool1d) or node.target is F.adaptive_avg_pool1d
        if size not in (1, (1,), (1, 1)):
            raise Unsupported(f"integer conversion: {where(node)}: pooling to {size}, not 1")
        dims, keep = ((-1,) if one_d else (2, 3)), True
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, list | tuple) else (dims,)
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    return lo.add_step(steps.Mean(dims, keep), (lo.emit(x, WIDE_D),), node.name, node.name)


def _norm(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    m = lo.gm.get_submodule(str(node.target))
    if len(m.normalized_shape) != 1:
        raise Unsupported(
            f"integer conversion: {where(node)} normalises over "
            f"{tuple(m.normalized_shape)}; the last dimension only"
        )
    w = m.weight if m.weight is not None else torch.ones(m.normalized_shape)
    b = m.bias if m.bias is not None else torch.zeros(m.normalized_shape)
    r = lo.r
    if demand[0] == "codes":
        g = demand[1]
        out = (g.scale, g.zero, g.lo, g.hi)
    elif demand == WIDE_D:
        out = (r.s_r, 0, -r.limit, r.limit)
    else:
        raise Unsupported(f"integer conversion: {where(node)} is read as {demand[0]}")
    ln = IntLayerNorm(w, b, m.eps, r.s_r, r.bits, *out)
    name = module_name(node)
    return lo.add_step(ln, (lo.emit(tensor_args(node)[0], WIDE_D),), name, name)


def _gelu(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    """GELU or another pointwise function (tanh, sigmoid, SiLU...): one exact table from
    its 16-bit input grid onto what the consumer reads (a grid, the residual stream, the
    logits), fused into a producing linear's epilogue when that linear has no other reader."""
    g_max = 2 ** (GELU_BITS - 1) - 1
    out = _table_format(lo, node, demand)
    table = pointwise_table(table_function(node), lo.r.gelu[node], -g_max, g_max, *out)
    x = tensor_args(node)[0]
    src = lo.an.through(x)
    if (
        lo.fuse
        and len(lo.demands(node)) == 1
        and lo.an.kind.get(src) == "acc"
        and lo.demands(src) == [("gelu", node)]
        and x is src
    ):
        op, relu, mult = lo.chain(src)
        if getattr(lo.spec(op), "kind", None) == "linear":
            rq = lo.requant_to(lo.acc_scale(op, mult), ("gelu", node), relu)
            return lo.op_step(op, rq, lut=table)
    name = f"{node.name}.table"
    return lo.add_step(steps.Lookup(table, -g_max), (lo.emit(x, ("gelu", node)),), name, node.name)


def _table_format(lo: Lowering, node: fx.Node, demand: tuple) -> tuple:
    """``(scale, zero, lo, hi)`` of the format a pointwise table writes for ``demand``."""
    if demand[0] == "codes":
        g = demand[1]
        return g.scale, g.zero, g.lo, g.hi
    if demand == WIDE_D:
        return lo.r.s_r, 0, -lo.r.limit, lo.r.limit
    if demand == LOGITS_D:
        l_max = 2 ** (LOGIT_BITS - 1) - 1
        return lo.r.logit_scale, 0, -l_max, l_max
    raise Unsupported(f"integer conversion: {where(node)} (by table) is read as {demand[0]}")


def _softmax(lo: Lowering, node: fx.Node, demand: tuple) -> fx.Node:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if node.op == "call_module":
        dim = lo.gm.get_submodule(str(node.target)).dim
    x = tensor_args(node)[0]
    if dim not in (-1, x.meta["value"].dim() - 1) or demand[0] != "codes":
        raise Unsupported(
            f"integer conversion: {where(node)}: softmax over the last dimension onto a grid only"
        )
    op, _, mult = lo.chain(lo.an.through(x))
    sm = IntSoftmax(float(lo.acc_scale(op, mult)))
    rq = IntRequant.to_grid(sm.out_scale, demand[1])
    return lo.add_step(steps.Softmax(sm, rq), (lo.emit(x, ACC_D),), node.name, node.name)
