"""The graph of a fake-quant model at the level integer conversion needs.

:func:`trace` runs ``torch.fx`` over the whole model with every quantized op and every
``torch.nn`` leaf (LayerNorm, GELU, Softmax, BatchNorm, Dropout...) kept as one node,
and everything else (the user's modules, ``nn.TransformerEncoderLayer``, the forwards that
:func:`hawq.models.prepare` rewrote) traced through.

Each proxy carries the value it has on example inputs (``node.meta["value"]``, see
:mod:`hawq.models.value_trace`): Python control flow on shapes, dtypes or flags takes the
branch of the example, while shapes read from tensors (``x.shape[0]``) stay graph nodes,
so the converted graph runs at any batch size. The branches are those that
:func:`~hawq.models.prepare` guarded on its example inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from keyword import iskeyword

import torch
from torch import fx, nn

from hawq.errors import HawqError
from hawq.models.value_trace import ValueTracer

QUANT_OPS = ("QuantLinear", "QuantConv2d", "QuantMatMul")


def is_quant_op(m: nn.Module) -> bool:
    return type(m).__name__ in QUANT_OPS


class _IntegerTracer(ValueTracer):
    """Quantized ops and ``torch.nn``'s childless modules are leaves; the rest is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes stay nodes

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_quant_op(m):
            return True
        return type(m).__module__.startswith("torch.nn") and not any(True for _ in m.children())


class _Entry(nn.Module):
    """``forward(x)`` calling the root model (so every model traces with one input ``x``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def keyword_entry(model: nn.Module, keys: list[str]) -> _Entry:
    """An entry whose ``forward(<keys>)`` calls ``model(key=key, ...)``: a model called with
    keyword inputs traces with one placeholder per key, named by it."""
    bad = [k for k in keys if not k.isidentifier() or iskeyword(k)]
    if bad:
        raise HawqError(f"integer conversion: input names {bad} are not Python identifiers")
    src = (
        f"def forward(self, {', '.join(keys)}):\n"
        f"    return self.model({', '.join(f'{k}={k}' for k in keys)})\n"
    )
    scope: dict = {}
    exec(src, scope)  # noqa: S102 - identifiers checked above; fx reads the signature
    return type("_KeywordEntry", (_Entry,), {"forward": scope["forward"]})(model)


def trace(qmodel: nn.Module, example) -> fx.GraphModule:
    """The fx graph of ``qmodel`` (eval mode) on ``example`` (one input tensor, or a dict of
    keyword inputs: one placeholder each); node targets name modules as ``model.<name>``,
    ``node.meta["value"]`` holds the example value of each node."""
    if isinstance(example, Mapping):
        entry, examples = keyword_entry(qmodel.eval(), list(example)), dict(example)
    else:
        entry, examples = _Entry(qmodel.eval()), {"x": example}
    tracer = _IntegerTracer()
    tracer.examples = examples
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
    _logits_output(graph)
    gm = fx.GraphModule(entry, graph)
    gm.graph.eliminate_dead_code()  # branch conditions the example decided
    gm.recompile()
    return gm


def _logits_output(graph: fx.Graph) -> None:
    """A model returning a ``transformers`` ``ModelOutput`` (a dict subclass built in the
    graph) returns its ``logits`` here, the one tensor integer inference computes."""
    (out,) = [n for n in graph.nodes if n.op == "output"]
    made = out.args[0]
    fields = made if isinstance(made, dict) else None  # fx stores the output as a dict
    if (
        isinstance(made, fx.Node)
        and made.op == "call_function"
        and isinstance(made.target, type)
        and issubclass(made.target, dict)
    ):
        fields = made.kwargs
    if fields is not None and isinstance(fields.get("logits"), fx.Node):
        out.args = (fields["logits"],)


def module_name(node: fx.Node) -> str:
    """The model's name of a ``call_module`` node's module (without the ``model.`` root)."""
    t = str(node.target)
    return t[len("model.") :] if t.startswith("model.") else t


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
