"""The graph of a fake-quant model at the level integer conversion needs.

:func:`trace` runs ``torch.fx`` over the whole model with every quantized op and every
``torch.nn`` leaf (LayerNorm, GELU, Softmax, BatchNorm, Dropout...) kept as one node,
and everything else (the user's modules, ``nn.TransformerEncoderLayer``, the forwards that
:func:`hawq.models.prepare` rewrote) traced through.

Each proxy carries the value it has on example inputs (``node.meta["value"]``), as the
``transformers`` fx tracer does with meta tensors: Python control flow on shapes, dtypes
or flags (``if x.dim() == 3``, ``n, l, _ = x.shape``) takes the branch of the example and
is not recorded, while shapes read from tensors (``x.shape[0]``) stay graph nodes, so the
converted graph runs at any batch size. Like :func:`~hawq.models.prepare`, the graph is
specialised to the control flow of the example.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from hawq.errors import HawqError

QUANT_OPS = ("QuantLinear", "QuantConv2d", "QuantMatMul")


def is_quant_op(m: nn.Module) -> bool:
    return type(m).__name__ in QUANT_OPS


class ValueProxy(fx.Proxy):
    """A proxy whose ``len`` is its example value's (``n, l, _ = x.shape`` unpacks)."""

    def __len__(self) -> int:
        return len(self.tracer.values[self.node])


class ValueTracer(fx.Tracer):
    """fx tracer whose proxies know their example values (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=())
        self.values: dict[fx.Node, Any] = {}
        self.computing = False  # inside an example computation: nothing is recorded

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_quant_op(m):
            return True
        return type(m).__module__.startswith("torch.nn") and not any(True for _ in m.children())

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        if self.computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _value(self, a: Any) -> Any:
        return tree_map(lambda v: self.values[v.node] if isinstance(v, fx.Proxy) else v, a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        if kind == "placeholder":
            self.values[proxy.node] = self.examples[target]
        elif kind != "output":
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        proxy.node.meta["value"] = self.values.get(proxy.node)
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        a, kw = self._value(args), self._value(kwargs)
        self.computing = True
        try:
            return self._compute(kind, target, a, kw)
        finally:
            self.computing = False

    def _compute(self, kind: str, target: Any, a: tuple, kw: dict) -> Any:
        with torch.no_grad():
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **kw)
            if kind == "get_attr":
                return _attr(self.root, target)
        raise HawqError(f"trace: unexpected node kind {kind}")

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.values[obj.node])

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self.values[obj.node]))])

    def keys(self, obj: fx.Proxy):
        return self.values[obj.node].keys()


def _attr(root: nn.Module, target: str) -> Any:
    """``root.<target>`` without ``nn.Module.__getattr__`` (fx patches it while tracing)."""
    obj: Any = root
    for part in target.split("."):
        d = obj.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if part in d.get(table, {}):
                obj = d[table][part]
                break
        else:
            obj = d[part] if part in d else object.__getattribute__(obj, part)
    return obj


class _Entry(nn.Module):
    """``forward(x)`` calling the root model (so every model traces with one input ``x``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def trace(qmodel: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The fx graph of ``qmodel`` (eval mode) on ``example``; node targets name modules as
    ``model.<name>``, ``node.meta["value"]`` holds the example value of each node."""
    entry = _Entry(qmodel.eval())
    tracer = ValueTracer()
    tracer.examples = {"x": example}
    tracer.root = entry
    try:
        with torch.no_grad():
            graph = tracer.trace(entry)
    except HawqError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise HawqError(
            f"integer conversion: cannot trace {type(qmodel).__name__}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    gm = fx.GraphModule(entry, graph)
    gm.graph.eliminate_dead_code()  # branch conditions the example decided
    gm.recompile()
    return gm


def module_name(node: fx.Node) -> str:
    """The model's name of a ``call_module`` node's module (without the ``model.`` root)."""
    t = str(node.target)
    return t[len("model.") :] if t.startswith("model.") else t


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
