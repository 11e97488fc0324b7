"""Make any model hawq-ready: every matrix product a named, quantizable op.

hawq finds quantizable ops by module type (:mod:`hawq.models.ops`). Products written
the ordinary way (``torch.matmul``, ``@``, ``F.scaled_dot_product_attention``,
``F.linear``, ``nn.MultiheadAttention``...) are not modules and would stay float.
:func:`prepare` rewrites them into named ops and measures what is left::

    prepared, report = prepare(model, example_inputs)
    report.ops            # every quantizable op name, e.g. "blocks.0.attn.qk"
    report.share          # captured share of the product FLOPs, 1.0 = nothing left out

How: (1) every ``nn.MultiheadAttention`` becomes a
:class:`~hawq.models.captured_mha.CapturedMultiheadAttention`; (2) every user module
(not ``torch.nn``'s own, not an op) that ran on the example inputs is traced with
``torch.fx`` *on its own*, its children as leaves, once in eval and once in train mode,
top-down (a module is traced with the arguments its traced caller passes it), by a tracer
whose proxies carry example values (:mod:`hawq.models.capture_trace`): control flow on
shapes and flags follows the example and is guarded, decorated and ``**kwargs`` forwards
(``transformers``') are traced through. Product nodes become new children
(:mod:`hawq.models.capture_rules`), named ``<module path>.<role>``, and the module's
``forward`` runs the rewritten graph of its current mode. Modules that cannot be traced
(control flow on tensor values...) keep their forward; their own products are reported.
Hooks on every module keep working, and module names, classes and methods stay.

Limits: non-tensor arguments (None, flags, ints, ``**kwargs`` keys) and branches are
specialised to the example inputs: a call that differs raises one :class:`HawqError`
line naming the argument or the source line; Python randomness or other state read while
tracing is frozen; the whole model pickles with its rewritten graphs (hawq's
:mod:`hawq.safe_load` allow-list does not know them); ``state_dict`` keys change where a
module was replaced or ``F.linear`` parameters moved (:attr:`CaptureReport.renamed`).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src
from torch.utils._pytree import tree_flatten

from hawq.errors import HawqError
from hawq.models.capture_rules import Namer, Unsupported, rewrite_graph
from hawq.models.capture_trace import Call, CaptureTracer, has_tensor, record_calls, same
from hawq.models.captured_mha import swap_attention
from hawq.models.coverage import LeftOut, count_flops, split_flops
from hawq.models.ops import as_call, is_quantizable, quantizable_ops

log = logging.getLogger("hawq")

#: prepared output vs original: assert_close tolerances
RTOL, ATOL = 1e-4, 1e-5


@dataclass
class CaptureReport:
    """What :func:`prepare` changed and how much product work the named ops carry.

    Attributes:
        ops: every quantizable op name of the prepared model, in registration order.
        added: ops created by the rewrite (subset of ``ops``).
        replaced: ``nn.MultiheadAttention`` modules replaced by the captured version.
        untraced: module name -> why fx could not trace it (its own products stay).
        renamed: old -> new ``state_dict`` key of parameters that moved into a new op.
        total_flops: product FLOPs of the prepared model on the example inputs.
        captured_flops: the part executed inside the quantizable ops.
        original_flops: product FLOPs of the original model.
        left_out: uncaptured products, largest first.
        max_abs_diff: largest |prepared - original| output element.
    """

    ops: list[str]
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    total_flops: int = 0
    captured_flops: int = 0
    original_flops: int = 0
    left_out: list[LeftOut] = field(default_factory=list)
    max_abs_diff: float = 0.0

    @property
    def share(self) -> float:
        """Captured share of the product FLOPs in [0, 1] (1.0 when there are none)."""
        return self.captured_flops / self.total_flops if self.total_flops else 1.0

    def summary(self) -> str:
        lines = [
            f"{len(self.ops)} quantizable ops ({len(self.added)} added, "
            f"{len(self.replaced)} attention modules replaced); captured "
            f"{self.share:.1%} of {self.total_flops} product FLOPs"
        ]
        lines += [f"  left out: {x}" for x in self.left_out]
        lines += [f"  not traced: {n or '<root>'}: {why}" for n, why in self.untraced.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tracing


def should_trace(module: nn.Module) -> bool:
    """User modules only: not ``torch.nn``'s own (fx cannot see inside their kernels
    anyway), not an op, not already captured."""
    cls = type(module)
    return not (
        cls.__module__.startswith("torch.")
        or is_quantizable(module)
        or getattr(module, "captured", False)
    )


def _compile(graph: fx.Graph):
    """The forward function of ``graph``: ``fn(self, *placeholders)`` (as GraphModule does)."""
    code = graph.python_code(root_module="self")
    return _forward_from_src(code.src, code.globals)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {tuple(value.shape)}"
    return repr(value)


class _GraphForward:
    """A captured module's forward: the rewritten graph of its current mode.

    Pickles (with the module) as its graphs, recompiled on load; deep copies share them.
    """

    def __init__(
        self,
        module: nn.Module,
        graphs: dict[bool, fx.Graph],
        concrete: dict,
        kw_keys: set[str] | None = None,
    ) -> None:
        sig = inspect.signature(type(module).forward)
        self.sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # without self
        self.module, self.graphs, self.concrete = module, graphs, concrete
        self.kw_keys = kw_keys  # the **kwargs keys of the example call
        self.fns = {mode: _compile(g) for mode, g in graphs.items()}

    def __call__(self, *args, **kwargs):
        bound = self.sig.bind(*args, **kwargs)
        bound.apply_defaults()
        params = self.sig.parameters
        for name, value in bound.arguments.items():  # traced as a tensor: must stay one
            if params[name].kind == params[name].VAR_KEYWORD and set(value) != self.kw_keys:
                raise HawqError(
                    f"{type(self.module).__name__}.forward was captured with keyword "
                    f"arguments {sorted(self.kw_keys or ())} in **{name}, got {sorted(value)}; "
                    "prepare() with example inputs that pass the same keywords as this call"
                )
            star = params[name].kind in (params[name].VAR_POSITIONAL, params[name].VAR_KEYWORD)
            if not star and name not in self.concrete and not has_tensor(value):
                raise HawqError(
                    f"{type(self.module).__name__}.forward was captured with a "
                    f"tensor {name}, got {value!r}; prepare() with example inputs "
                    "that pass the same arguments as this call"
                )
            if name in self.concrete and not same(value, self.concrete[name]):
                raise HawqError(
                    f"{type(self.module).__name__}.forward was captured with {name}="
                    f"{_short(self.concrete[name])} on prepare()'s example inputs, got "
                    f"{_short(value)}; prepare() with example inputs that pass {name} as "
                    "this call does"
                )
        return self.fns[self.module.training](self.module, *bound.args, **bound.kwargs)

    def __reduce__(self):
        return _GraphForward, (self.module, self.graphs, self.concrete, self.kw_keys)

    def __deepcopy__(self, memo: dict) -> _GraphForward:
        new = object.__new__(_GraphForward)
        new.__dict__.update(self.__dict__)  # graphs and compiled functions shared
        new.module = copy.deepcopy(self.module, memo)
        return new


def capture_module(module: nn.Module, call: Call) -> tuple[Namer, dict[nn.Module, Call]]:
    """Trace ``module`` (eval and train mode), rewrite its products, install the forward.

    Every module that traces runs its graph from then on, products or not, so its
    submodules are called exactly as the graph calls them (``transformers`` builds
    attention masks differently while tracing than eagerly).

    Returns:
        The :class:`Namer` with the children created, and how the eval graph calls its
        submodules (the example calls to trace them with).

    Raises:
        Unsupported: the module cannot be traced (the reason is the message).
    """
    if not call.consistent:
        raise Unsupported("called with different non-tensor arguments; cannot specialise")
    graphs, tracers = {}, {}
    was_training = module.training
    try:
        for mode in (False, True):
            module.training = mode
            tracers[mode] = CaptureTracer(module, call)
            graphs[mode] = tracers[mode].trace(module)
    except (HawqError, Unsupported):
        raise
    except Exception as e:  # noqa: BLE001 - any trace failure leaves the module as it was
        raise Unsupported(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        module.training = was_training
    namer = Namer(module)
    try:
        for g in graphs.values():
            rewrite_graph(g, namer)
    except Unsupported:
        for name in namer.created:
            delattr(module, name)
        raise
    for attr in namer.moved:
        delattr(module, attr)  # now owned by the new nn.Linear
    _order_children(module, graphs[False])
    kw_keys = next((set(v) for k, v in call.examples.items() if k.startswith("**")), None)
    module.forward = _GraphForward(module, graphs, call.concrete, kw_keys)
    return namer, tracers[False].child_calls


def _order_children(module: nn.Module, graph: fx.Graph) -> None:
    """Children in order of first call in ``graph`` (so ops list in execution order);
    children never called keep their place after them."""
    used = []
    for node in graph.nodes:
        if node.op == "call_module":
            head = node.target.split(".")[0]
            if head not in used:
                used.append(head)
    old = module._modules
    module._modules = {k: old[k] for k in [*used, *(k for k in old if k not in used)] if k in old}


# ----------------------------------------------------------------------------- prepare


def _max_abs_diff(out, ref) -> float:
    a, b = tree_flatten(out)[0], tree_flatten(ref)[0]
    ta = [t for t in a if isinstance(t, torch.Tensor)]
    tb = [t for t in b if isinstance(t, torch.Tensor)]
    if len(ta) != len(tb):
        raise HawqError(
            f"prepare: the prepared model returns {len(ta)} tensors, the original {len(tb)}"
        )
    for x, y in zip(ta, tb):
        torch.testing.assert_close(
            x,
            y,
            rtol=RTOL,
            atol=ATOL,
            equal_nan=True,
            msg=lambda m: f"prepare: outputs differ: {m}",
        )
    return max(
        (
            float((x.float() - y.float()).abs().nan_to_num().max())
            for x, y in zip(ta, tb)
            if x.numel()
        ),
        default=0.0,
    )


def _capture_all(model: nn.Module, args: tuple, kwargs: dict, report: CaptureReport) -> None:
    calls = record_calls(model, args, kwargs)
    for name, module in list(model.named_modules()):
        if not should_trace(module) or module not in calls:
            continue
        try:
            namer, child_calls = capture_module(module, calls[module])
        except Unsupported as e:
            report.untraced[name] = str(e)
            continue
        calls.update(child_calls)  # pre-order: submodules are traced after their caller
        prefix = f"{name}." if name else ""
        report.added += [prefix + n for n in namer.created]
        report.renamed.update({prefix + a: prefix + b for a, b in namer.moved.items()})


def prepare(
    model: nn.Module, example_inputs, *, strict: bool = False, inplace: bool = False
) -> tuple[nn.Module, CaptureReport]:
    """Rewrite ``model`` so every matrix product is a named quantizable op.

    Args:
        model: any module (its products may be functional or ``nn.MultiheadAttention``).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword
            inputs (token ids included); used to run the model, never to train it.
        strict: raise when any product FLOPs are left out (share < 1).
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        ``(prepared model, report)``; the prepared model computes the same outputs.

    Raises:
        HawqError: ``strict`` and something is left out, or the prepared model's outputs
            differ from the original's on ``example_inputs`` (computed with torch's fused
            attention fast path off: its nested-tensor path zeroes padded positions).
    """
    args, kwargs = as_call(example_inputs)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the reference: no fused/nested path
    try:
        ref, counts0 = count_flops(model, args, kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    prepared = model if inplace else copy.deepcopy(model)
    prepared, replaced, skipped = swap_attention(prepared)
    report = CaptureReport(
        ops=[],
        replaced=replaced,
        untraced=dict(skipped),
        original_flops=sum(counts0.get("", {}).values()),
    )
    _capture_all(prepared, args, kwargs, report)
    out, counts = count_flops(prepared, args, kwargs)
    report.max_abs_diff = _max_abs_diff(out, ref)
    report.ops = list(quantizable_ops(prepared))
    report.total_flops, report.captured_flops, report.left_out = split_flops(prepared, counts)
    if report.left_out:
        where = "; ".join(str(x) for x in report.left_out)
        if strict:
            raise HawqError(
                f"prepare: {1 - report.share:.1%} of the product FLOPs stay float (strict): {where}"
            )
        log.warning(
            "prepare: %.1f%% of the product FLOPs are not captured and stay float: %s",
            100 * (1 - report.share),
            where,
        )
    return prepared, report
