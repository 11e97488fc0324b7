"""An integer ``fx`` graph as plain data, and back.

:class:`~hawq.integer.graph.convert.IntegerGraph` keeps its graph as a list of node
records (JSON-able: names, op kinds, targets, arguments) beside its integer steps, so that
a pickled integer model holds only allow-listed classes (:mod:`hawq.safe_load`) and
``integer.json`` describes the graph by op name. Functions are stored by name and rebuilt
only from :data:`FUNCTIONS`: nothing else can be called by a decoded graph.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq.errors import HawqError


def stored_name(f) -> str:
    """How a stored graph names function ``f`` (``torch.cat``, ``F.pad``, ``operator.add``)."""
    module = getattr(f, "__module__", None) or "torch"
    if module == "torch.nn.functional":
        return f"F.{f.__name__}"
    if module in ("_operator", "operator", "builtins"):
        return f"{module.lstrip('_')}.{f.__name__}"
    return f"torch.{f.__name__}"


def _functions() -> dict:
    """Functions a stored graph may call: the analysis's shape ops, concatenation and zero
    padding, shape arithmetic on sizes read from tensors, and the float-island ops."""
    from hawq.integer.graph import islands
    from hawq.integer.graph.analyze import INDEX_FUNCTIONS, SHAPE_FUNCTIONS

    arithmetic = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv)
    fns = (*SHAPE_FUNCTIONS, torch.cat, F.pad, builtins.getattr, *arithmetic, *islands.FUNCTIONS)
    fns = tuple(dict.fromkeys((*fns, *INDEX_FUNCTIONS)))  # index arithmetic on token ids
    named = {stored_name(f): f for f in fns}
    assert len(named) == len(set(fns)), "two allowed functions share a stored name"
    return named


FUNCTIONS = _functions()
NAMES = {f: name for name, f in FUNCTIONS.items()}


def _encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, slice):
        return {"slice": [_encode_arg(a.start), _encode_arg(a.stop), _encode_arg(a.step)]}
    if isinstance(a, tuple):
        return {"tuple": [_encode_arg(x) for x in a]}
    if isinstance(a, list):
        return [_encode_arg(x) for x in a]
    if isinstance(a, dict):
        return {"dict": {k: _encode_arg(v) for k, v in a.items()}}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if a is None or isinstance(a, bool | int | float | str):
        return a
    raise HawqError(f"integer graph: cannot store the argument {a!r} ({type(a).__name__})")


def _decode_arg(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode_arg(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    ((key, v),) = a.items()
    if key == "node":
        return env[v]
    if key == "slice":
        return slice(*(_decode_arg(x, env) for x in v))
    if key == "tuple":
        return tuple(_decode_arg(x, env) for x in v)
    if key == "dict":
        return {k: _decode_arg(x, env) for k, x in v.items()}
    if key == "ellipsis":
        return Ellipsis
    if key == "dtype":
        return getattr(torch, v)
    raise HawqError(f"integer graph: unknown argument record {a!r}")


def _methods() -> set[str]:
    from hawq.integer.graph.analyze import INDEX_METHODS, SHAPE_METHODS
    from hawq.integer.graph.islands import METHODS

    return SHAPE_METHODS | METHODS | INDEX_METHODS | {"size", "dim"}


def encode(graph: fx.Graph) -> list[dict]:
    """The node records of ``graph``."""
    out = []
    for n in graph.nodes:
        target = n.target
        if n.op == "call_function":
            if target not in NAMES:
                raise HawqError(f"integer graph: function {target} is not storable")
            target = NAMES[target]
        out.append(
            {
                "name": n.name,
                "op": n.op,
                "target": str(target),
                "args": _encode_arg(tuple(n.args))["tuple"],
                "kwargs": {k: _encode_arg(v) for k, v in n.kwargs.items()},
            }
        )
    return out


def decode(records: list[dict], root: nn.Module) -> fx.GraphModule:
    """The ``fx.GraphModule`` over ``root`` (the steps) that ``records`` describe."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for r in records:
        args = tuple(_decode_arg(a, env) for a in r["args"])
        kwargs = {k: _decode_arg(v, env) for k, v in r["kwargs"].items()}
        op, target = r["op"], r["target"]
        if op == "call_function":
            if target not in FUNCTIONS:
                raise HawqError(f"integer graph: function {target} is not allowed")
            target = FUNCTIONS[target]
        elif op == "call_method" and target not in _methods():
            raise HawqError(f"integer graph: tensor method {target} is not allowed")
        if op == "output":
            node = graph.output(args[0])
        elif op == "placeholder":
            node = graph.placeholder(target)
        else:
            node = graph.create_node(op, target, args, kwargs, name=r["name"])
        env[r["name"]] = node
    return fx.GraphModule(root, graph)
