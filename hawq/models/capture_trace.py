"""How :func:`hawq.models.prepare` traces one module: the example call and its guards.

Each user module is traced on its own (children are leaves) with the arguments it was
called with on the example inputs (:func:`record_calls`), by a
:class:`~hawq.models.value_trace.ValueTracer`, so Python control flow on shapes and flags
(``if seq_len > 1``, ``if attention_mask is not None``) follows the example, as
``transformers``' code needs. What the example decided is checked again on every call:

* a branch taken on a shape, dtype or flag becomes a :func:`branch_guard` node (a branch
  on tensor *values*, ``if x.sum() > 0``, would differ batch to batch: such a module is
  not captured, and its products are reported as left out);
* a non-tensor value read from ``*args``/``**kwargs`` (a flag, ``None``, a config
  object) becomes that constant, checked by a :func:`kwarg_guard` node;
* non-tensor named arguments (``None``, flags, tuples of sizes, objects) are the example's
  values while tracing; the captured forward checks them on every call.

So a captured module either computes exactly what the original would on a call, or
raises a :class:`~hawq.errors.HawqError` naming the line whose decision changed.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from hawq.errors import HawqError
from hawq.models.capture_rules import Unsupported
from hawq.models.coverage import count_flops
from hawq.models.value_trace import ValueTracer

_MISSING = object()


def has_tensor(value) -> bool:
    """A tensor, or an fx proxy standing for one (a prepared model traced again)."""
    return any(isinstance(v, torch.Tensor | fx.Proxy) for v in tree_flatten(value)[0])


def same(a, b) -> bool:
    """``a`` and ``b`` are the same non-tensor value (identical, or equal of one type)."""
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # noqa: BLE001 - uncomparable values are different
        return False


# ----------------------------------------------------------------------------- guards


@fx.node.has_side_effect
def branch_guard(cond, taken: bool, where: str) -> None:
    """Raise unless ``bool(cond)`` is ``taken``, the branch the example inputs took."""
    if bool(cond) != taken:
        raise HawqError(
            f"captured module {where} was {taken} on prepare()'s example inputs and is "
            f"{not taken} on this call; prepare() with example inputs that take this branch"
        )


@fx.node.has_side_effect
def kwarg_guard(container, key, expected, where: str, default=_MISSING) -> None:
    """Raise unless ``container[key]`` (``.get(key, default)`` when a default is given)
    is ``expected``, the example's non-tensor value."""
    try:
        got = container[key]
    except (KeyError, IndexError):
        got = default
    if not same(got, expected):
        shown = "absent" if got is _MISSING else repr(got)
        raise HawqError(
            f"captured module: {where}: argument {key!r} was {expected!r} on prepare()'s "
            f"example inputs and is {shown} on this call; prepare() with example inputs "
            "that pass the same non-tensor arguments"
        )


def plain(value) -> bool:
    """A constant a graph can hold: None, bool, number, str, dtype, device, or a
    tuple/list of them."""
    if isinstance(value, tuple | list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | torch.dtype | torch.device)


def _user_line() -> str:
    """``file:line`` of the innermost frame outside torch and this module (the code whose
    decision is being recorded)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(skip):
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


# ----------------------------------------------------------------------------- example calls


@dataclass
class Call:
    """How a module was called on the example inputs.

    Attributes:
        examples: placeholder name -> value of the first call (fx names ``*args`` and
            ``**kwargs`` placeholders with their stars).
        concrete: the named non-tensor arguments (their example values are traced).
        consistent: every call passed the same non-tensor named arguments.
    """

    examples: dict[str, Any]
    concrete: dict[str, Any] = field(default_factory=dict)
    consistent: bool = True


def _placeholder_name(p: inspect.Parameter) -> str:
    stars = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    return stars + p.name


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> Call | None:
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    params = sig.parameters
    examples = {_placeholder_name(params[k]): v for k, v in bound.arguments.items()}
    concrete = {
        k: v
        for k, v in bound.arguments.items()
        if params[k].kind not in (params[k].VAR_POSITIONAL, params[k].VAR_KEYWORD)
        and not has_tensor(v)
    }
    return Call(examples, concrete)


def note_call(calls: dict[nn.Module, Call], module: nn.Module, a: tuple, kw: dict) -> None:
    """Add one call of ``module`` to ``calls``: the first gives the example values, a later
    one with other non-tensor arguments marks the module inconsistent."""
    call = _bind(module, a, kw)
    if call is None:
        return
    seen = calls.get(module)
    if seen is None:
        calls[module] = call
    elif seen.concrete.keys() != call.concrete.keys() or not all(
        same(v, seen.concrete[k]) for k, v in call.concrete.items()
    ):
        seen.consistent = False


def record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, Call]:
    """One eval no-grad forward recording how each module was called."""
    calls: dict[nn.Module, Call] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        note_call(calls, module, a, kw)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        count_flops(model, args, kwargs)  # a plain eval no-grad forward
    finally:
        for h in handles:
            h.remove()
    return calls


# ----------------------------------------------------------------------------- the tracer


class CaptureTracer(ValueTracer):
    """Traces one module's own forward on its example call; children are leaves.

    Records :func:`branch_guard` / :func:`kwarg_guard` nodes (module docstring)."""

    def __init__(self, root: nn.Module, call: Call) -> None:
        super().__init__()
        self.root, self.examples, self.concrete = root, call.examples, call.concrete
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes stay nodes
        self.star_args: set[fx.Node] = set()
        self.child_calls: dict[nn.Module, Call] = {}  # how the graph calls its modules

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        if not self.computing:
            note_call(self.child_calls, m, self.value_of(args), self.value_of(kwargs))
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders as fx makes them, but the function traced receives the example's
        value for every non-tensor named argument (``None``, flags, a tuple of sizes: the
        captured forward checks them on every call). A decorated forward
        (``functools.wraps``, as ``transformers`` wraps most) is traced *through* its
        wrapper: placeholders come from the wrapped signature and are passed to the
        wrapper the way a caller would pass them."""
        inner = inspect.unwrap(root_fn)
        fn, args = super().create_args_for_root(inner, is_module, concrete_args)
        params = list(inspect.signature(inner).parameters.values())

        def concrete(values) -> list:
            return [self.concrete.get(p.name, v) for p, v in zip(params, values)]

        if inner is root_fn:
            return (lambda *values: fn(*concrete(values))), args
        by_position = any(p.kind == p.VAR_POSITIONAL for p in params)

        def call_wrapper(*values):  # self and positional-only by position, the rest by name
            values = concrete(values)
            pos, kw = [values[0]], {}
            for p, v in zip(params[1:], values[1:]):
                if p.kind == p.VAR_POSITIONAL:
                    pos.extend(v)
                elif p.kind == p.VAR_KEYWORD:
                    kw.update({k: v[k] for k in v.keys()})
                elif p.kind == p.POSITIONAL_ONLY or (
                    by_position and p.kind == p.POSITIONAL_OR_KEYWORD
                ):
                    pos.append(v)
                else:
                    kw[p.name] = v
            return root_fn(*pos, **kw)

        return call_wrapper, args

    def create_arg(self, a: Any):
        """A dict subclass in the graph (a ``transformers`` ``ModelOutput``, an
        ``OrderedDict``) is rebuilt with its own class, not flattened to a plain dict."""
        if (
            isinstance(a, dict)
            and type(a) is not dict
            and not isinstance(a, fx.Proxy)
            and all(isinstance(k, str) for k in a)
        ):
            fields = super().create_arg(dict(a.items()))
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def on_branch(self, cond: fx.Proxy, taken: bool) -> None:
        where = f"{type(self.root).__name__}: the condition at {_user_line()}"
        if self._reads_data(cond.node):
            raise Unsupported(f"control flow on tensor values ({where})")
        self.create_proxy("call_function", branch_guard, (cond, taken, where), {})

    def _reads_data(self, node: fx.Node) -> bool:
        """The value of ``node`` depends on tensor contents, not only on shapes, dtypes or
        non-tensor arguments (a guard on it would fail on the next batch, not on misuse)."""
        if isinstance(self.values.get(node), torch.Tensor):
            return True
        if node.op == "call_method" and node.target in ("item", "tolist"):
            return True
        return any(
            self._reads_data(a)
            for a in node.all_input_nodes
            if not isinstance(self.values.get(a), torch.Tensor)
        )

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        if kind == "placeholder" and str(target).startswith("*"):
            self.star_args.add(proxy.node)
        constant = self._star_constant(kind, target, args)
        if constant is None:
            return proxy
        container, key, default = constant
        value = self.values[proxy.node]
        where = f"{type(self.root).__name__} ({_user_line()})"
        guard_args = (container, key, value, where) + (() if default is _MISSING else (default,))
        self.create_proxy("call_function", kwarg_guard, guard_args, {})
        return value

    def _star_constant(self, kind, target, args) -> tuple[fx.Proxy, Any, Any] | None:
        """``(container, key, default)`` when this node reads a plain constant from
        ``*args`` or ``**kwargs`` (``kwargs["flag"]``, ``kwargs.get("flag", False)``), else
        None; ``default`` is ``_MISSING`` for an item read."""
        if self.computing or len(args) < 2 or not isinstance(args[0], fx.Proxy):
            return None
        if args[0].node not in self.star_args:
            return None
        if kind == "call_function" and target is operator.getitem:
            key, default = args[1], _MISSING
            value = self.values[args[0].node][key]
        elif kind == "call_method" and target == "get":
            key, default = args[1], args[2] if len(args) > 2 else None
            value = self.values[args[0].node].get(key, default)
        else:
            return None
        return (
            (args[0], key, default)
            if plain(value) and plain(default if default is not _MISSING else None)
            else None
        )
