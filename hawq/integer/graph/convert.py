"""Integer-only conversion of any prepared, fake-quant model, driven by its graph.

``convert_graph(qmodel, batches)``:

1. traces the fake-quant model (:mod:`.trace`): quantized ops, LayerNorm, GELU, softmax,
   BatchNorm... as nodes, the user's code traced through;
2. gives every value its integer kind and every consumer its demand (:mod:`.analyze`);
   a node with no integer form ends conversion with one line naming it;
3. sizes the formats the fake-quant model leaves in float on calibration batches: the
   residual stream (largest value where it is clamped: adds, ReLUs of the stream), each
   GELU input, the logits;
4. lowers the graph to integer steps (:mod:`.lower`, :mod:`.materialize`).

The result is an :class:`IntegerGraph`: ``quantize_input`` (float -> codes on the first
op's grid; token ids pass as they are), ``forward_int`` (codes -> int32 logits),
``forward`` (float logits).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from hawq.batches import batch_size, sample_slice, to_device
from hawq.errors import HawqError
from hawq.integer.adapter import Grid
from hawq.integer.graph import pointwise, program
from hawq.integer.graph.analyze import Unsupported, analyze, tensor_args, where
from hawq.integer.graph.lower import GELU_BITS, LOGITS_D, WIDE_D, Lowering, Ranges
from hawq.integer.graph.trace import trace
from hawq.integer.layers import LOGIT_BITS, IntegerModel, residual_format

log = logging.getLogger("hawq")


class IntegerGraph(IntegerModel):
    """An integer-only model: integer steps and the graph that calls them.

    Attributes:
        steps: the integer steps (``nn.Module`` children holding only integers).
        nodes: the graph as plain records (:mod:`.program`), keyed by node name.
        in_grid: the input quantizer's grid.
        logit_scale: real value of one logit code.
        ops: step name -> the model's op or module it implements.
        s_r, limit: the residual stream's scale and code bound.
        op_paths: quantized op name -> path of its integer layer in :attr:`steps`.
        float_ops: the float islands, where they sit (empty: the model is integer-only).
        input_names: the keyword inputs of a model called ``model(**inputs)`` (token ids,
            attention masks), in the program's order; None: one positional input.
        grid_input: which of them the input grid quantizes (None: all are integers).
    """

    def __init__(
        self,
        steps: nn.Module,
        nodes: list[dict],
        in_grid: Grid,
        logit_scale: float,
        ops: dict[str, str],
        s_r: float,
        limit: int,
        op_paths: dict[str, str],
        float_ops: list[str] | None = None,
        input_names: list[str] | None = None,
        grid_input: str | None = None,
    ) -> None:
        super().__init__()
        self.float_ops = list(float_ops or [])  # float islands (empty: integer-only)
        self.input_names, self.grid_input = input_names, grid_input
        self.steps, self.nodes = steps, nodes
        self.in_grid, self.logit_scale = in_grid, logit_scale
        self.ops, self.s_r, self.limit, self.op_paths = ops, s_r, limit, op_paths

    @property
    def program(self) -> fx.GraphModule:
        """The runnable graph (built from :attr:`nodes` once; not pickled)."""
        gm = self.__dict__.get("_program")
        if gm is None:
            gm = program.decode(self.nodes, self.steps)
            self.__dict__["_program"] = gm
        return gm

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_program"}

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_program", None)  # rebuilt over the moved steps
        return super()._apply(fn, recurse)

    def quantize_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images onto the first op's grid; token ids (no input grid) pass as they are."""
        if self.in_grid is None:
            if images.is_floating_point():
                raise HawqError("integer model: this model reads integer token ids, not floats")
            return images
        return self.in_grid.quantize(images)

    def forward_int(self, *x: torch.Tensor) -> torch.Tensor:
        return self.program(*x)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Float logits from the model's inputs: one tensor, or its keyword inputs (the float
        one quantized onto the input grid, integer ones passed as they are)."""
        if self.input_names is None:
            return super().forward(*args, **kwargs)
        given = dict(zip(self.input_names, args), **kwargs)
        missing = [k for k in self.input_names if k not in given]
        unknown = sorted(set(given) - set(self.input_names))
        if missing or unknown:
            raise HawqError(
                f"integer model: inputs {self.input_names}; "
                + (f"missing {missing}" if missing else f"unknown {unknown}")
            )
        codes = []
        for k in self.input_names:
            v = given[k]
            if k == self.grid_input:
                codes.append(self.in_grid.quantize(v))
            elif v.is_floating_point():
                raise HawqError(f"integer model: input {k!r} must be integer (ids, masks)")
            else:
                codes.append(v)
        return self.forward_int(*codes).to(torch.float32) * self.logit_scale

    def describe(self) -> dict:
        """The graph by op name: each node with the step it calls and the op it implements."""
        out = []
        for r in self.nodes:
            entry = dict(r)
            if r["op"] == "call_module":
                entry["step"] = type(self.steps.get_submodule(r["target"])).__name__
                entry["implements"] = self.ops.get(r["target"])
            out.append(entry)
        return {
            "input_grid": None if self.in_grid is None else self.in_grid.as_dict(),
            "logit_scale": self.logit_scale,
            "residual": {"scale": self.s_r, "limit": self.limit},
            "float_ops": self.float_ops,
            "inputs": self.input_names,
            "graph": out,
        }


def clamp_points(lo: Lowering) -> list[fx.Node]:
    """Nodes whose float values the residual range must cover: where the stream is clamped
    (adds, unless only a ReLU reads them; ReLUs of the stream; ReLU'd accumulators joining it),
    and embedding lookups (their tables are quantised onto it)."""
    an, out = lo.an, []
    for node, r in an.role.items():
        wide_relu = r == "relu" and an.kind[node] == "wide"
        lone_add = r == "add" and not (
            len(node.users) == 1 and an.role.get(next(iter(node.users))) == "relu"
        )
        acc_relu = r == "relu" and an.kind[node] == "acc" and WIDE_D in lo.demands(node)
        if wide_relu or lone_add or acc_relu or r == "embed":
            out.append(node)
    return out


@torch.no_grad()
def observe(
    gm: fx.GraphModule, batches: Iterable, nodes: list[fx.Node], max_batches: int
) -> dict[fx.Node, float]:
    """Largest ``|value|`` of each of ``nodes`` over up to ``max_batches`` batches."""
    found = {n: 0.0 for n in nodes}
    watched = set(nodes)

    class Watch(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n in watched:
                found[n] = max(found[n], float(v.detach().abs().max()))
            return v

    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        inputs = batch_inputs(batch)
        Watch(gm).run(*(inputs.values() if isinstance(inputs, Mapping) else [inputs]))
        seen += 1
    if not seen:
        raise HawqError("integer conversion needs at least one calibration batch")
    return found


def _finite(v: float) -> float:
    return v if math.isfinite(v) and v > 0 else 1.0


@torch.no_grad()
def convert_graph(
    qmodel: nn.Module,
    batches: Iterable,
    residual_bits: int = 16,
    pack_int4: bool = True,
    max_batches: int = 4,
    margin: float = 1.25,
    fuse: bool = True,
    float_islands: bool = False,
) -> IntegerGraph:
    """Integer-only model equivalent to the fake-quant ``qmodel`` (see the module docstring).

    Raises:
        HawqError: a node with no integer form (one line naming it and where it is;
            ``float_islands`` leaves allow-listed ones in float instead, listed in
            ``float_ops``), or a model whose output is not one tensor.
    """
    if not 8 <= residual_bits <= 24:
        raise HawqError(f"residual_bits={residual_bits} is invalid; allowed: 8-24")
    model = copy.deepcopy(qmodel).cpu().eval()
    batches = list(_take(batches, max_batches))
    first = batch_inputs(batches[0])
    gm = trace(model, sample_slice(first, 0, 2, batch_size(first)))
    pointwise.fold(gm)  # activations written out elementwise: one table each
    an = analyze(gm, float_islands)
    lo = Lowering(gm, an, None, pack_int4, fuse)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    if not isinstance(result, fx.Node) or not tensor_args(out) == [result]:
        raise Unsupported("integer conversion: the model must return one tensor of logits")
    clamps = clamp_points(lo)
    gelus = [n for n, r in an.role.items() if r == "gelu"]
    points = [*clamps, *(tensor_args(g)[0] for g in gelus), result]
    found = observe(gm, batches, points, max_batches)
    residual = margin * max((found[n] for n in clamps), default=1.0)
    limit, s_r = residual_format(_finite(residual), residual_bits)
    g_max = 2 ** (GELU_BITS - 1) - 1
    gelu = {g: max(_finite(margin * found[tensor_args(g)[0]]), 1.0) / g_max for g in gelus}
    l_max = 2 ** (LOGIT_BITS - 1) - 1
    logit_scale = max(_finite(2 * found[result]), 1e-6) / l_max
    lo.r = Ranges(s_r, limit, residual_bits, gelu, logit_scale)
    lo.graph.output(lo.emit(result, LOGITS_D))
    nodes = program.encode(lo.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    float_ops = [where(n) for n in sorted(lo.float_ops, key=order.__getitem__)]
    if float_ops:
        log.warning(
            "integer conversion: %d op(s) left in float between dequantize and quantize: %s",
            len(float_ops),
            "; ".join(float_ops),
        )
    return IntegerGraph(
        lo.root,
        nodes,
        lo.in_grid,
        logit_scale,
        lo.names,
        s_r,
        limit,
        lo.op_paths,
        float_ops,
        lo.input_names,
        lo.grid_input,
    ).eval()


def batch_inputs(batch) -> Any:
    """The inputs of a ``(x, y)`` pair or of a bare batch (a tensor or a dict of keyword
    inputs), on the CPU."""
    return to_device(batch[0] if isinstance(batch, tuple | list) else batch, "cpu")


def _take(batches: Iterable, n: int):
    for i, b in enumerate(batches):
        if i >= n:
            return
        yield b
