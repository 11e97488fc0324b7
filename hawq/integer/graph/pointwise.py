"""Pointwise sub-graphs of one tensor folded into one node, computed by one exact table.

Activations are often written out elementwise rather than called: GPT-2's
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, CLIP's ``x sigmoid(1.702 x)``, a swish
``x * torch.sigmoid(x)``. Each op alone has no integer form (a product of two activations),
but together they are a function of one tensor ``x``: :func:`fold` finds every maximal
region of elementwise ops whose only tensor input is one node and whose inner values are
read only inside it, and replaces it with one call of a :class:`PointwiseRegion` module
(the region as its own small graph). The converter then treats that node as it treats GELU:
an exact table from a 16-bit input grid onto what reads it (:mod:`.materialize`).

Regions are folded only when they hold a nonlinear op or a product of two values of ``x``:
scalings by constants stay what they are (they fold into requantisation more precisely).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

#: elementwise functions (scalars allowed as other operands)
FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
    torch.neg,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.erf,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
}
METHODS = {"add", "sub", "mul", "div", "pow", "neg", "tanh", "sigmoid", "exp", "erf"}
NONLINEAR = {torch.tanh, torch.sigmoid, torch.exp, torch.erf, torch.pow, operator.pow}
NONLINEAR |= {torch.nn.functional.sigmoid, torch.nn.functional.tanh}
NONLINEAR_METHODS = {"tanh", "sigmoid", "exp", "erf", "pow"}


class PointwiseRegion(nn.Module):
    """An elementwise function of one tensor, as the small graph it was traced as."""

    def __init__(self, graph: fx.Graph) -> None:
        super().__init__()
        self.fn = fx.GraphModule(nn.Module(), graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in FUNCTIONS
    return node.op == "call_method" and node.target in METHODS


def _region(out: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """``(region nodes in graph order, its source)`` ending at ``out``, or None."""
    region, sources, todo = set(), set(), [out]
    while todo:
        n = todo.pop()
        if n in region:
            continue
        region.add(n)
        for a in n.all_input_nodes:
            if not isinstance(a.meta.get("value"), torch.Tensor):
                return None  # a size or flag read from a tensor: not a pure function
            if _elementwise(a):
                todo.append(a)
            else:
                sources.add(a)
    if len(sources) != 1 or len(region) < 2:
        return None
    value = out.meta.get("value")
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return None  # index arithmetic on ids stays what it is
    if not reads_input(next(iter(sources))):
        return None  # a function of parameters only: a constant, not an activation
    if any(u not in region for n in region - {out} for u in n.users):
        return None  # an inner value read outside: the region is not one function
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    return sorted(region, key=order.__getitem__), next(iter(sources))


def reads_input(node: fx.Node) -> bool:
    """Whether ``node`` depends on the model input (else it is a constant of the model)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        todo.extend(n.all_input_nodes)
    return False


def _worth_folding(nodes: list[fx.Node], source: fx.Node) -> bool:
    for n in nodes:
        if n.target in NONLINEAR or (n.op == "call_method" and n.target in NONLINEAR_METHODS):
            return True
        if len(n.all_input_nodes) >= 2:  # a product or sum of two values of x (x * sigmoid(x))
            return True
    return False


def _subgraph(nodes: list[fx.Node], source: fx.Node) -> fx.Graph:
    g = fx.Graph()
    env = {source: g.placeholder("x")}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[nodes[-1]])
    return g


def fold(gm: fx.GraphModule) -> int:
    """Replace every maximal foldable region of ``gm`` with a :class:`PointwiseRegion`
    call (``meta["value"]`` kept); returns how many were folded."""
    folded = 0
    for out in reversed(list(gm.graph.nodes)):
        if out.graph is not gm.graph or not _elementwise(out):
            continue  # (erased with a region folded before)
        if all(_elementwise(u) for u in out.users) and out.users:
            continue  # not the end of a region
        found = _region(out)
        if found is None or not _worth_folding(*found):
            continue
        nodes, source = found
        name = f"pointwise_{folded}"
        gm.add_module(name, PointwiseRegion(_subgraph(nodes, source)))
        with gm.graph.inserting_after(out):
            new = gm.graph.call_module(name, (source,))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
        folded += 1
    if folded:
        gm.recompile()
    return folded
