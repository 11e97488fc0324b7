"""Float islands: nodes with no integer form, left in float between a dequantize and a
quantize (``convert(..., float_islands=True)``, config ``integer.float_islands``).

An island reads each input dequantized from the integer format its producer has (an
accumulator at ``s_x s_w``, the residual stream at ``s_r``, codes on a grid, softmax at
``2^-16``; LayerNorm and GELU write the residual grid for it), runs the original op in
float32 and quantizes its output onto whatever its consumers read. Nonlinear ops reading an
island join it; adds and quantized ops end it. Only allow-listed functions, tensor methods
and ``torch.nn`` layers may form islands (:data:`FUNCTIONS`, :data:`METHODS`,
:data:`MODULES`), so a stored integer graph calls nothing else. The converted model lists
its islands in ``float_ops``; the ``integer`` stage reports them.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq.integer.graph import steps
from hawq.integer.graph.analyze import Unsupported, tensor_args, where

FLOAT_D = ("float",)
FUNCTIONS = (
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.clamp,
    torch.softmax,
    torch.mean,
    torch.mul,
    torch.matmul,
    F.silu,
    F.sigmoid,
    F.tanh,
    F.softplus,
    F.elu,
    F.leaky_relu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.gelu,
    F.relu,
    F.softmax,
    F.layer_norm,
    F.linear,
    F.conv2d,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    F.normalize,
    operator.mul,
    operator.truediv,
    operator.add,
    operator.sub,
    operator.pow,
    operator.neg,
    operator.matmul,
)
METHODS = {
    "sigmoid",
    "tanh",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "clamp",
    "softmax",
    "mean",
    "sum",
    "mul",
    "div",
    "pow",
    "relu",
    "float",
    "matmul",
}
MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Softmax,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Mish,
    nn.ELU,
    nn.LeakyReLU,
)


def check_float_op(gm: fx.GraphModule, node: fx.Node) -> None:
    """Raise :class:`Unsupported` unless ``node`` may form a float island."""
    if node.op == "call_module":
        ok = type(gm.get_submodule(str(node.target))) in MODULES
    elif node.op == "call_method":
        ok = node.target in METHODS
    else:
        ok = node.target in FUNCTIONS
    if not ok:
        raise Unsupported(
            f"integer conversion: {where(node)} has no integer-only form and "
            "is not allowed in a float island"
        )


def value(lo, node: fx.Node, demand: tuple) -> fx.Node:
    """An island's output: float (``FLOAT_D``), or quantized onto ``demand``."""
    if demand == FLOAT_D:
        return _run_in_float(lo, node)
    x = lo.emit(node, FLOAT_D)
    r = lo.r
    if demand[0] == "codes":
        step = steps.QuantizeInput(demand[1])
    elif demand[0] == "wide":
        step = steps.Quantize(r.s_r, -r.limit, r.limit)
    elif demand[0] == "gelu":
        g_max = 2**15 - 1
        step = steps.Quantize(r.gelu[demand[1]], -g_max, g_max)
    elif demand[0] == "logits":
        l_max = 2**15 - 1
        step = steps.Quantize(r.logit_scale, -l_max, l_max)
    else:
        raise Unsupported(
            f"integer conversion: {where(node)} (float island) is read as {demand[0]}"
        )
    return lo.add_step(step, (x,), f"{node.name}.quantize", node.name)


def _run_in_float(lo, node: fx.Node) -> fx.Node:
    lo.float_ops.append(node)
    ins = set(tensor_args(node))

    def arg(a):
        return lo.emit(a, FLOAT_D) if a in ins else lo.arg(a)

    if node.op != "call_module":
        return lo.graph.node_copy(node, arg)
    module = copy.deepcopy(lo.gm.get_submodule(str(node.target))).float().eval()
    args = tuple(fx.node.map_arg(a, arg) for a in node.args)
    return lo.add_step(module, args, f"float.{node.name}", str(node.target))


def dequantized(lo, node: fx.Node, kind: str) -> fx.Node:
    """A non-island value in float32, for an island to read."""
    from hawq.integer.graph.lower import WIDE_D

    if kind == "param":
        return lo.const(node.meta["value"].detach().float().cpu(), str(node.target) + "_f")
    if kind == "float":
        raise Unsupported("integer conversion: a float island reads the model input directly")
    if kind == "acc":
        op, relu, mult = lo.chain(node)
        acc = lo.memo.get((op, "raw")) or lo._raw(op)
        dim = 1 if getattr(lo.spec(op), "kind", None) == "conv2d" else -1
        step = steps.Dequantize(lo.acc_scale(op, mult), 0, dim, relu)
        return lo.add_step(step, (acc,), f"{node.name}.dequantize", node.name)
    if kind == "softmax":
        return _softmax_float(lo, node)
    wide = lo.emit(node, WIDE_D)  # wide, norm and gelu write the residual grid for it
    step = steps.Dequantize(torch.tensor(lo.r.s_r, dtype=torch.float64))
    return lo.add_step(step, (wide,), f"{node.name}.dequantize", node.name)


def _softmax_float(lo, node: fx.Node) -> fx.Node:
    from hawq.integer.graph.lower import ACC_D
    from hawq.integer.softmax import IntSoftmax

    x = tensor_args(node)[0]
    op, _, mult = lo.chain(lo.an.through(x))
    sm = IntSoftmax(float(lo.acc_scale(op, mult)))
    codes = lo.add_step(sm, (lo.emit(x, ACC_D),), node.name, node.name)
    step = steps.Dequantize(torch.tensor(sm.out_scale, dtype=torch.float64))
    return lo.add_step(step, (codes,), f"{node.name}.dequantize", node.name)
