"""Graph rewrites that turn functional matrix products into named op modules.

Each rule replaces one ``torch.fx`` node of a module's own graph (its children are
leaves) by a call to a new child module of that module, named by role:

=================================================  =======================================
functional product                                 becomes
=================================================  =======================================
``torch.matmul``, ``@``, ``torch.bmm``, ``mm``      ``MatMul`` ``matmul``, ``matmul_1``...
``F.scaled_dot_product_attention``                 ``MatMul`` ``qk`` -> scale, masks,
                                                   softmax, dropout -> ``MatMul`` ``av``
``torch.einsum`` (2 operands, no ``...``)          permute/reshape -> ``MatMul`` ``einsum``
``torch.addmm(c, a, b)`` (GPT-2's ``Conv1D``)      ``c +`` ``MatMul`` ``addmm`` of ``a``, ``b``
``F.linear(x, W, b)``, W and b own Parameters       ``nn.Linear`` ``linear`` (takes over W, b)
``F.linear(x, W, b)``, any other W                 ``MatMul`` ``linear`` of ``x`` and ``W^T``
=================================================  =======================================

The runtime helpers below are module-level functions so generated code can import them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq.models.ops import MatMul

Tensor = torch.Tensor

MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


class Unsupported(Exception):
    """A rewrite cannot be done consistently; the module is left as it was."""


# ----------------------------------------------------------------------------- runtime helpers


def sdpa_key_t(query: Tensor, key: Tensor, enable_gqa: bool) -> Tensor:
    """``key^T`` (..., E, S), with key heads repeated for grouped-query attention."""
    return _gqa(query, key, enable_gqa).transpose(-2, -1)


def sdpa_value(query: Tensor, value: Tensor, enable_gqa: bool) -> Tensor:
    """``value`` (..., S, Ev), with heads repeated for grouped-query attention."""
    return _gqa(query, value, enable_gqa)


def _gqa(query: Tensor, kv: Tensor, enable_gqa: bool) -> Tensor:
    if enable_gqa and kv.dim() >= 3 and kv.shape[-3] != query.shape[-3]:
        return kv.repeat_interleave(query.shape[-3] // kv.shape[-3], dim=-3)
    return kv


def sdpa_probs(
    scores: Tensor,
    query: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> Tensor:
    """The reference SDPA between the products: ``softmax(scores * scale + bias)``, then
    dropout with ``dropout_p`` (always, like SDPA: callers pass 0 in eval).

    Args:
        scores: (..., L, S) = ``query @ key^T``.
        query: (..., L, E), for the default scale ``1/sqrt(E)``.
    """
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = scores * scale
    l, s = scores.shape[-2:]
    if is_causal:
        keep = torch.ones(l, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = scores.softmax(dim=-1)
    return F.dropout(probs, dropout_p) if dropout_p > 0 else probs


def linear_weight_t(weight: Tensor) -> Tensor:
    """``W^T`` (in, out) of a ``F.linear`` weight (out, in)."""
    return weight.transpose(-2, -1) if weight.dim() >= 2 else weight


@lru_cache(maxsize=256)
def einsum_plan(equation: str) -> tuple[str, str, str, str, str, str, str] | None:
    """``(a, b, out, batch, left, contract, right)`` index strings, or None if the
    two-operand equation is not a plain batched matmul (``...``, repeats, sums)."""
    eq = equation.replace(" ", "")
    if "..." in eq or eq.count(",") != 1:
        return None
    lhs, _, out = eq.partition("->")
    a, b = lhs.split(",")
    if "->" not in eq:  # implicit output: indices seen once, sorted
        out = "".join(sorted(c for c in a + b if (a + b).count(c) == 1))
    if any(len(set(t)) != len(t) for t in (a, b, out)) or set(out) - set(a + b):
        return None
    batch = "".join(c for c in out if c in a and c in b)
    left = "".join(c for c in out if c in a and c not in b)
    right = "".join(c for c in out if c in b and c not in a)
    contract = "".join(c for c in a if c not in out)
    if set(contract) != set(c for c in b if c not in out):
        return None
    return a, b, out, batch, left, contract, right


def _sizes(idx: str, a: str, ta: Tensor, b: str, tb: Tensor) -> list[int]:
    def size(c: str) -> int:
        sa = ta.shape[a.index(c)] if c in a else 1
        sb = tb.shape[b.index(c)] if c in b else 1
        return max(sa, sb)  # size-1 dims broadcast, as in einsum

    return [size(c) for c in idx]


def einsum_operands(equation: str, ta: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``A`` (batch, left, contract) and ``B`` (batch, contract, right)
    flattened to 3-D, so ``einsum(equation, ta, tb)`` is a reshape of ``A @ B``."""
    a, b, _out, batch, left, contract, right = einsum_plan(equation)
    sz = {
        c: n
        for c, n in zip(
            batch + left + contract + right, _sizes(batch + left + contract + right, a, ta, b, tb)
        )
    }
    n_b, n_l, n_k, n_r = (math.prod(sz[c] for c in g) for g in (batch, left, contract, right))
    pa = ta.permute([a.index(c) for c in batch + left + contract])
    pb = tb.permute([b.index(c) for c in batch + contract + right])
    pa = pa.expand([sz[c] for c in batch + left + contract]).reshape(n_b, n_l, n_k)
    pb = pb.expand([sz[c] for c in batch + contract + right]).reshape(n_b, n_k, n_r)
    return pa, pb


def einsum_result(equation: str, product: Tensor, ta: Tensor, tb: Tensor) -> Tensor:
    """(batch, left, right) product -> the einsum output layout."""
    a, b, out, batch, left, _contract, right = einsum_plan(equation)
    order = batch + left + right
    y = product.reshape(_sizes(order, a, ta, b, tb))
    return y.permute([order.index(c) for c in out])


# ----------------------------------------------------------------------------- graph rewrites


class Namer:
    """Creates the new children of one module under stable role names (``qk``, ``qk_1``...).

    Rewriting a second graph of the same module (the train-mode trace) with a fresh
    :meth:`start` hands out the same names and reuses the modules already created.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.created: dict[str, nn.Module] = {}
        self.counts: dict[str, int] = {}
        self.moved: dict[str, str] = {}  # old parameter attribute -> "<new child>.<weight|bias>"

    def start(self) -> None:
        self.counts = {}

    def get(self, role: str, make: Callable[[], nn.Module]) -> str:
        while True:
            k = self.counts.get(role, 0)
            self.counts[role] = k + 1
            name = role if k == 0 else f"{role}_{k}"
            if name in self.created:
                return name
            if not hasattr(self.module, name):
                self.module.add_module(name, make())
                self.created[name] = self.module.get_submodule(name)
                return name


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def rewrite_matmul(g: fx.Graph, node: fx.Node, namer: Namer) -> fx.Node | None:
    if node.kwargs or len(node.args) != 2:  # out=...: left as it is
        return None
    return g.call_module(namer.get("matmul", MatMul), tuple(node.args))


def rewrite_sdpa(g: fx.Graph, node: fx.Node, namer: Namer) -> fx.Node:
    a = {n: _arg(node, i, n, d) for i, (n, d) in enumerate(zip(SDPA_PARAMS, SDPA_DEFAULTS))}
    q, k, v = a["query"], a["key"], a["value"]
    kt = g.call_function(sdpa_key_t, (q, k, a["enable_gqa"]))
    vv = g.call_function(sdpa_value, (q, v, a["enable_gqa"]))
    scores = g.call_module(namer.get("qk", MatMul), (q, kt))
    probs = g.call_function(
        sdpa_probs, (scores, q, a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"])
    )
    return g.call_module(namer.get("av", MatMul), (probs, vv))


def rewrite_einsum(g: fx.Graph, node: fx.Node, namer: Namer) -> fx.Node | None:
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if node.kwargs or not isinstance(eq, str) or len(ops) != 2 or einsum_plan(eq) is None:
        return None  # left as it is (reported by the coverage check)
    pair = g.call_function(einsum_operands, (eq, *ops))
    pa, pb = (g.call_function(operator.getitem, (pair, i)) for i in (0, 1))
    prod = g.call_module(namer.get("einsum", MatMul), (pa, pb))
    return g.call_function(einsum_result, (eq, prod, *ops))


def _own_param(module: nn.Module, node) -> nn.Parameter | None:
    """The Parameter a ``get_attr`` node reads when it is a direct attribute of
    ``module`` read only by one node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or "." in node.target:
        return None
    p = module._parameters.get(node.target)
    return p if p is not None and len(node.users) == 1 else None


def _adopt(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=False, device="meta")
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = weight
    lin.bias = bias
    return lin


def rewrite_linear(g: fx.Graph, node: fx.Node, namer: Namer) -> fx.Node:
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    pw, pb = _own_param(namer.module, w), _own_param(namer.module, b)
    if pw is not None and pw.dim() == 2 and (b is None or pb is not None):
        name = namer.get("linear", lambda: _adopt(pw, pb))
        lin = namer.created[name]
        if not isinstance(lin, nn.Linear) or lin.weight is not pw or lin.bias is not pb:
            raise Unsupported("F.linear parameters differ between the eval and train graphs")
        namer.moved[w.target] = f"{name}.weight"
        if b is not None:
            namer.moved[b.target] = f"{name}.bias"
        return g.call_module(name, (x,))
    wt = g.call_function(linear_weight_t, (w,))
    y = g.call_module(namer.get("linear", MatMul), (x, wt))
    return y if b is None else g.call_function(operator.add, (y, b))


def rewrite_addmm(g: fx.Graph, node: fx.Node, namer: Namer) -> fx.Node | None:
    """``torch.addmm(bias, a, b, beta=, alpha=)`` (``transformers``' ``Conv1D``: GPT-2) ->
    ``beta * bias + alpha * MatMul(a, b)``."""
    bias, a, b = (_arg(node, i, n) for i, n in enumerate(("input", "mat1", "mat2")))
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"input", "mat1", "mat2", "beta", "alpha"} or a is None or b is None:
        return None  # out=...: left as it is (reported by the coverage check)
    y = g.call_module(namer.get("addmm", MatMul), (a, b))
    if alpha != 1:
        y = g.call_function(operator.mul, (y, alpha))
    if beta != 1:
        bias = g.call_function(operator.mul, (bias, beta))
    return y if beta == 0 else g.call_function(operator.add, (bias, y))


def product_rule(node: fx.Node) -> Callable[[fx.Graph, fx.Node, Namer], fx.Node | None] | None:
    """The rewrite for a node computing a matrix product, or None."""
    if node.op == "call_method" and node.target in MATMUL_METHODS:
        return rewrite_matmul
    if node.op != "call_function":
        return None
    if node.target in MATMUL_FUNCS:
        return rewrite_matmul
    return {
        F.scaled_dot_product_attention: rewrite_sdpa,
        F.linear: rewrite_linear,
        torch.einsum: rewrite_einsum,
        torch.addmm: rewrite_addmm,
    }.get(node.target)


def rewrite_graph(g: fx.Graph, namer: Namer) -> int:
    """Replace the product nodes of ``g`` in place; returns how many were replaced.
    Products no rule supports (3-operand einsum, ``out=``...) stay as they are.

    Raises:
        Unsupported: a rewrite that would differ between the eval and train graphs.
    """
    namer.start()
    n = 0
    for node in list(g.nodes):
        rule = product_rule(node)
        if rule is None:
            continue
        with g.inserting_before(node):
            new = rule(g, node, namer)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        g.erase_node(node)
        n += 1
    for node in list(g.nodes):  # parameters taken over by a new nn.Linear
        if node.op == "get_attr" and node.target in namer.moved and not node.users:
            g.erase_node(node)
    g.lint()
    return n
