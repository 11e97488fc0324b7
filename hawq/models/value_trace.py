"""An ``torch.fx`` tracer whose proxies carry their values on example inputs.

Plain fx cannot trace Python control flow on traced values (``if x.dim() == 3``,
``n, l, _ = x.shape``, ``if attention_mask is not None and mask.shape[1] > 1``), which is
how ordinary models (``transformers``' included) are written. Here every proxy also holds
the value it has on the example inputs (``node.meta["value"]``), as ``transformers``' own
fx tracer does with meta tensors: control flow follows the example's branch, while sizes
read from tensors (``x.shape[0]``) stay graph nodes, so graphs run at other batch sizes.

Each decision taken on a traced value is passed to :meth:`ValueTracer.on_branch`:
:func:`hawq.models.prepare` records it as a guard that fails loudly on an input taking
the other branch; integer conversion re-traces an already guarded model and ignores it.

Subclasses choose the leaves (:meth:`fx.Tracer.is_leaf_module`) and set ``examples``
(placeholder name -> value; ``*args`` and ``**kwargs`` placeholders are named with their
stars, as fx names them) and ``root`` before :meth:`trace`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from hawq.errors import HawqError


class ValueProxy(fx.Proxy):
    """A proxy whose ``len`` is its example value's (``n, l, _ = x.shape`` unpacks)."""

    def __len__(self) -> int:
        return len(self.tracer.values[self.node])


class ValueTracer(fx.Tracer):
    """fx tracer whose proxies know their example values (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=())
        self.values: dict[fx.Node, Any] = {}
        self.examples: dict[str, Any] = {}
        self.computing = False  # inside an example computation: nothing is recorded

    def trace(self, root, concrete_args=None):
        """fx's trace, with ``torch.finfo`` / ``torch.iinfo`` of a traced dtype answered from
        its example value (``torch.finfo(x.dtype).min``: a constant of the example's dtype)."""
        finfo, iinfo = torch.finfo, torch.iinfo

        def concrete(info):
            return lambda t=None: info() if t is None else info(self.value_of(t))

        torch.finfo, torch.iinfo = concrete(finfo), concrete(iinfo)
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.finfo, torch.iinfo = finfo, iinfo

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        if self.computing or m not in (getattr(self, "submodule_paths", None) or {m: ""}):
            return forward(*args, **kwargs)  # a module made on the fly (nn.ReLU()(x)): inline
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def value_of(self, a: Any) -> Any:
        """``a`` with every proxy replaced by its example value."""

        def value(v):
            if isinstance(v, fx.Proxy):
                return self.values[v.node]
            if isinstance(v, slice):  # x[:, a:b] with traced bounds
                return slice(value(v.start), value(v.stop), value(v.step))
            return v

        return tree_map(value, a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        if name is None and str(target) == "self":  # a child named self (BERT's attention)
            name = "self_module"  # would shadow the generated forward's self
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        if kind == "placeholder":
            self.values[proxy.node] = self._example(str(target))
        elif kind != "output":
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        proxy.node.meta["value"] = self.values.get(proxy.node)
        return proxy

    def _example(self, name: str) -> Any:
        if name in self.examples:
            return self.examples[name]
        base, _, count = name.rpartition("_")  # fx's placeholder of a concrete argument:
        if count.isdigit() and base in self.examples:  # leaf <count> of its pytree
            leaves = tree_flatten(self.examples[base])[0]
            return leaves[int(count) - 1] if len(leaves) >= int(count) else self.examples[base]
        raise HawqError(f"trace: no example value for the input {name!r}")

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        a, kw = self.value_of(args), self.value_of(kwargs)
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
                return _run_in_eval(self.root.get_submodule(target), a, kw)
            if kind == "get_attr":
                return attr_of(self.root, target)
        raise HawqError(f"trace: unexpected node kind {kind}")

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        taken = bool(self.values[obj.node])
        self.on_branch(obj, taken)
        return taken

    def on_branch(self, cond: fx.Proxy, taken: bool) -> None:
        """A Python decision on a traced value took ``taken``; the default ignores it."""

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self.values[obj.node]))])

    def keys(self, obj: fx.Proxy):
        return self.values[obj.node].keys()


def _run_in_eval(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` in eval mode (example values never update BatchNorm
    statistics, whatever mode is being traced), its modes restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        return module(*args, **kwargs)
    finally:
        for m, training in modes:
            m.training = training


def attr_of(root: nn.Module, target: str) -> Any:
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
