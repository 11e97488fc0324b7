"""What each node of a traced fake-quant graph is in the integer domain (no scales yet).

Every tensor value gets a **kind**:

* ``float``: the model input (before the first quantizer; only shape ops may touch it);
* ``index``: integer tensors: a model input of token ids, integer buffers (position ids),
  and what index arithmetic (:data:`INDEX_FUNCTIONS`, :data:`INDEX_METHODS`) makes of them;
  they pass to the integer graph as they are, and an embedding reads them;
* ``param``: a parameter or buffer read by the graph (class token, positions);
* ``acc``: the int32 accumulator of a quantized op, with what is folded into it on the way
  to its consumers (a BatchNorm, a ReLU, a multiplication by a constant);
* ``wide``: the residual stream (int32 at one scale ``s_r``): adds, concatenations, means,
  and embedding lookups (the table quantised at ``s_r``);
* ``norm``, ``gelu``, ``softmax``: the outputs of LayerNorm, of a pointwise function
  computed by table (GELU, tanh, sigmoid, SiLU...: :data:`TABLE_FUNCTIONS`) and softmax.

Shape ops (view, reshape, permute, transpose, flatten, getitem, expand, dropout in eval...)
are **transparent**: a value keeps its kind through them, and a consumer's **demand**
(the format it reads: codes on its grid, the residual stream, the GELU grid, the raw
accumulator, the logits) reaches through them to the producer. A node with no integer
form is a :class:`Unsupported` naming it and where it is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq.errors import HawqError
from hawq.integer.graph.pointwise import PointwiseRegion, reads_input
from hawq.integer.graph.trace import is_quant_op, module_name

SHAPE_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "contiguous",
    "expand",
    "squeeze",
    "unsqueeze",
    "unflatten",
    "chunk",
    "split",
    "unbind",
    "clone",
}
SHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.unbind,
    operator.getitem,
}
IDENTITY_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
ADD = {operator.add, operator.iadd, torch.add}
RELU = {F.relu, torch.relu}
#: pointwise functions computed exactly by a table from a 16-bit input grid (the "gelu" role)
TABLE_FUNCTIONS = {
    F.gelu: F.gelu,
    torch.tanh: torch.tanh,
    F.tanh: torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    F.silu: F.silu,
    F.hardswish: F.hardswish,
    F.mish: F.mish,
}
TABLE_METHODS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}
TABLE_MODULES = (nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Hardswish, nn.Mish, PointwiseRegion)
#: integer arithmetic on index tensors (position ids from a mask, token-type ids)
INDEX_FUNCTIONS = {
    torch.gather,
    torch.diff,
    torch.argmax,
    torch.remainder,
    operator.le,
    operator.lt,
    operator.ge,
    operator.gt,
    operator.and_,
    operator.or_,
    operator.invert,
    operator.mod,
    operator.floordiv,
    torch.cumsum,
    torch.ne,
    torch.eq,
    torch.arange,
    operator.add,
    operator.sub,
    operator.mul,
    operator.ne,
    operator.eq,
}
INDEX_METHODS = set(
    "gather cumsum ne eq long int to type_as add mul new_ones le lt ge gt argmax bool sub".split()
)
SOFTMAX = {F.softmax, torch.softmax}
MEAN = {torch.mean, F.adaptive_avg_pool2d, F.adaptive_avg_pool1d}


class Unsupported(HawqError):
    """A node with no integer form."""


def where(node: fx.Node) -> str:
    """``node`` named for a user: its module, or its function and the module it sits in."""
    if node.op == "call_module":
        return f"{module_name(node)} ({_module_of(node).__class__.__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    inside = next(reversed(stack.values()), ("", None))[0] if stack else ""
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}" + (f" in {inside}" if inside else "") + f" (node {node.name})"


def _module_of(node: fx.Node) -> nn.Module:
    return node.graph.owning_module.get_submodule(str(node.target))


def is_tensor(node) -> bool:
    v = node.meta.get("value") if isinstance(node, fx.Node) else None
    if isinstance(v, tuple | list):
        return bool(v) and all(isinstance(t, torch.Tensor) for t in v)
    return isinstance(v, torch.Tensor)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's tensor inputs in argument order (lists flattened, e.g. ``torch.cat``)."""
    out = []
    for a in [*node.args, *node.kwargs.values()]:
        for x in a if isinstance(a, list | tuple) else [a]:
            if isinstance(x, fx.Node) and is_tensor(x):
                out.append(x)
    return out


def _method_or_function(node: fx.Node, methods: set, functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or (
        node.op == "call_function" and node.target in functions
    )


def _device_move(node: fx.Node) -> bool:
    """``x.to(device)``: no dtype change, so the value passes as it is."""
    if node.op != "call_method" or node.target != "to":
        return False
    args = [*node.args[1:], *node.kwargs.values()]
    return not any(isinstance(a, torch.dtype) for a in args) and "dtype" not in node.kwargs


def is_shape(node: fx.Node) -> bool:
    if _device_move(node):
        return True
    if node.op == "call_module":
        return isinstance(_module_of(node), IDENTITY_MODULES)
    if node.op == "call_function" and node.target is F.dropout:
        return True
    return _method_or_function(node, SHAPE_METHODS, SHAPE_FUNCTIONS) and is_tensor(node.args[0])


def is_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.pad


def role(node: fx.Node) -> str:
    """What a non-transparent tensor node computes: ``qop``, ``bn``, ``relu``, ``scale``,
    ``add``, ``cat``, ``mean``, ``norm``, ``gelu``, ``softmax``."""
    if node.op == "call_module":
        m = _module_of(node)
        if is_quant_op(m):
            return "qop"
        for kind, cls in (
            ("bn", nn.BatchNorm2d),
            ("relu", nn.ReLU),
            ("norm", nn.LayerNorm),
            ("gelu", TABLE_MODULES),
            ("softmax", nn.Softmax),
            ("embed", nn.Embedding),
        ):
            if isinstance(m, cls):
                return kind
        if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool1d):
            return "mean"
    checks = (
        ("relu", {"relu"}, RELU),
        ("add", {"add", "__add__"}, ADD),
        ("gelu", set(TABLE_METHODS), set(TABLE_FUNCTIONS)),
        ("embed", set(), {F.embedding}),
        ("softmax", {"softmax"}, SOFTMAX),
        ("mean", {"mean"}, MEAN),
        ("cat", set(), {torch.cat}),
        ("scale", {"mul", "div"}, {operator.mul, operator.truediv}),
        ("mask", {"masked_fill"}, set()),
    )
    for kind, methods, functions in checks:
        if _method_or_function(node, methods, functions):
            return kind
    raise Unsupported(f"integer conversion: {where(node)} has no integer-only form")


@dataclass
class Analysis:
    """Kinds of every tensor node (see the module docstring) and the roles behind them."""

    kind: dict[fx.Node, str]
    role: dict[fx.Node, str]

    def through(self, node: fx.Node) -> fx.Node:
        """The producer behind a chain of transparent ops."""
        while node not in self.role and node.op not in ("placeholder", "get_attr"):
            node = tensor_args(node)[0]
        return node


#: nonlinear roles that cannot read a float island's output: they join the island
JOINS_ISLAND = ("bn", "scale", "relu", "gelu", "softmax", "norm", "mean")


def analyze(gm: fx.GraphModule, islands: bool = False) -> Analysis:
    """Kinds and roles of ``gm``'s nodes. A node with no integer form raises
    :class:`Unsupported`, or with ``islands`` becomes a float island (role and kind
    ``island``: dequantized inputs, float op, quantized output; see :mod:`.islands`)."""
    kind: dict[fx.Node, str] = {}
    roles: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind[node] = "index" if _is_index(node) else "float"
        elif node.op == "get_attr":
            kind[node] = ("index" if _is_index(node) else "param") if is_tensor(node) else "meta"
        elif node.op == "output" or not is_tensor(node):
            continue
        elif is_shape(node) or (is_pad(node) and _zero_pad(node)):
            kind[node] = kind[tensor_args(node)[0]]
        elif _is_index_op(node, kind):
            roles[node], kind[node] = "index", "index"
        else:
            inputs = [kind[a] for a in tensor_args(node)]
            try:
                r = role(node)
                if islands and "island" in inputs and r in JOINS_ISLAND:
                    raise Unsupported("reads a float island")
                k = _kind_of(node, r, inputs)
            except Unsupported:
                if not islands:
                    raise
                from hawq.integer.graph.islands import check_float_op

                check_float_op(gm, node)
                r = k = "island"
            roles[node], kind[node] = r, k
    return Analysis(kind, roles)


def is_bias(node: fx.Node, kind: dict) -> bool:
    """An ``add`` of an accumulator and a constant (a parameter, or one gathered by index:
    a relative position bias) that only softmax reads, or a ``masked_fill`` of scores by a
    mask made from ids: its integer form adds the constant (fills the value), in the
    accumulator's units, on the int32 scores."""
    adds = _method_or_function(node, {"add", "__add__", "masked_fill"}, ADD)
    return kind.get(node) == "acc" and adds


def _feeds_softmax(node: fx.Node) -> bool:
    """Whether every reader of ``node``, through shape ops, is a softmax."""
    users = list(node.users)
    while users:
        u = users.pop()
        if not is_tensor(u):
            continue
        if is_shape(u) or _adds_constant(u) or _masks(u):
            users.extend(u.users)
        elif not (u.op != "call_module" and _method_or_function(u, {"softmax"}, SOFTMAX)) and not (
            u.op == "call_module" and isinstance(_module_of(u), nn.Softmax)
        ):
            return False
    return True


def _masks(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "masked_fill"


def _adds_constant(node: fx.Node) -> bool:
    """An ``add`` one of whose operands depends on no model input (a bias, a mask)."""
    if not _method_or_function(node, {"add", "__add__"}, ADD):
        return False
    return any(not reads_input(a) for a in tensor_args(node))


def _is_index(node: fx.Node) -> bool:
    v = node.meta.get("value")
    return isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex()


def _is_index_op(node: fx.Node, kind: dict) -> bool:
    """Index arithmetic: an allow-listed op whose tensor inputs are all index values."""
    ins = tensor_args(node)
    allowed = _method_or_function(node, INDEX_METHODS, INDEX_FUNCTIONS)
    return allowed and _is_index(node) and all(kind.get(a) == "index" for a in ins)


def table_function(node: fx.Node, module: nn.Module | None = None):
    """The float function a ``gelu``-role node applies (its table is built from it)."""
    if node.op == "call_module":
        m = module if module is not None else _module_of(node)
        if isinstance(m, nn.GELU):
            return lambda x: F.gelu(x, approximate=m.approximate)
        if isinstance(m, PointwiseRegion):
            return m  # the folded elementwise graph, evaluated in float64 for the table
        return m.__class__()  # the stateless activation itself
    if node.op == "call_method":
        return TABLE_METHODS[node.target]
    if node.target is F.gelu:
        approximate = node.kwargs.get("approximate", "none")
        return lambda x: F.gelu(x, approximate=approximate)
    return TABLE_FUNCTIONS[node.target]


def _zero_pad(node: fx.Node) -> bool:
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return mode == "constant" and not value


def constant_factor(node: fx.Node) -> float | None:
    """The number a ``mul``/``div`` node applies to its tensor (a literal, or a value read
    from static shapes such as ``head_dim ** -0.5``), or None if it is a tensor."""
    if len(node.args) != 2 or not is_tensor(node.args[0]):
        return None
    c = node.args[1]
    if isinstance(c, fx.Node):
        c = c.meta.get("value")
    return float(c) if isinstance(c, int | float) and not isinstance(c, bool) else None


def _kind_of(node: fx.Node, r: str, inputs: list[str]) -> str:
    if r in ("qop",):
        return "acc"
    if r in ("bn", "scale"):
        if inputs[:1] != ["acc"]:
            raise Unsupported(
                f"integer conversion: {where(node)} must follow a quantized op "
                f"(it reads a {inputs[0] if inputs else 'constant'} value)"
            )
        if r == "scale" and constant_factor(node) is None:
            raise Unsupported(
                f"integer conversion: {where(node)} multiplies by a tensor; "
                "only constants fold into the accumulator scale"
            )
        return "acc"
    if r == "relu":
        return inputs[0]
    if r == "add" and sorted(inputs) == ["acc", "param"] and _feeds_softmax(node):
        return "acc"  # a constant bias on attention scores: added to the accumulator
    if r in ("add", "cat", "mean"):
        return "wide"
    if r == "mask":
        if inputs[:2] != ["acc", "index"] or not _feeds_softmax(node):
            raise Unsupported(
                f"integer conversion: {where(node)}: only scores read by softmax may be masked "
                "by ids-derived masks"
            )
        return "acc"
    if r == "embed":
        if inputs[:1] != ["index"]:
            raise Unsupported(f"integer conversion: {where(node)} looks up a non-integer input")
        return "wide"
    return r  # norm, gelu, softmax
