"""Lower an analysed fake-quant graph to an integer-only ``fx`` graph.

Each consumer asks its input for a format (a *demand*, see :mod:`.analyze`); the producer
is materialised once per distinct format, and shape ops are replayed on what was
materialised. Rules (the numerics of the hand-written ViT/ResNet classes):

* an accumulator read by the residual stream is requantised to it once (to ``+-WIDE``, or
  ``[0, limit]`` after a ReLU) and every other reader requantises from there;
* otherwise each demanded format gets its own requantisation of the accumulator, fused
  into the op's epilogue when there is only one;
* LayerNorm reads the residual stream and writes each consumer's grid directly; GELU is
  a table from its 16-bit input grid onto its consumer's grid (fused into the producing
  linear's epilogue when it is the only reader); softmax reads the raw accumulator;
* adds clamp to ``+-limit`` (a ReLU after them to ``[0, limit]``); constants meeting the
  stream are quantised at its scale;
* token ids and masks (``index`` values, one input each when the model takes keyword inputs,
  :mod:`.sources`) pass as they are, index arithmetic is replayed on them, and
  an embedding is a lookup in its table quantised onto the stream (or a grid); GELU's table
  serves every pointwise function of :data:`~.analyze.TABLE_FUNCTIONS` (tanh, sigmoid...).

Fusions (residual add in a linear/conv epilogue, GELU table in fc1's, fused attention)
compute the same integers as the unfused steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq.integer import adapter
from hawq.integer.adapter import Grid
from hawq.integer.graph import sources, steps
from hawq.integer.graph.analyze import (
    Analysis,
    Unsupported,
    constant_factor,
    is_bias,
    is_tensor,
    tensor_args,
    where,
)
from hawq.integer.graph.sources import BIAS_LIMIT, INDEX_D, WIDE_D
from hawq.integer.graph.trace import module_name
from hawq.integer.layers import LOGIT_BITS, WIDE, IntConv2d, IntLinear, IntMatMul, IntRequant

GELU_BITS = 16
ACC_D = ("acc",)
LOGITS_D = ("logits",)


@dataclass
class Ranges:
    """Calibrated formats: residual scale and bound, GELU input scales, logit scale."""

    s_r: float
    limit: int
    bits: int
    gelu: dict[fx.Node, float] = field(default_factory=dict)  # GELU node -> input scale
    logit_scale: float = 1.0


def codes(grid: Grid) -> tuple:
    return ("codes", grid)


class Lowering:
    """Builds the integer graph (see the module docstring) from ``gm`` and its analysis."""

    def __init__(
        self, gm: fx.GraphModule, an: Analysis, ranges: Ranges, pack_int4: bool, fuse: bool = True
    ) -> None:
        self.gm, self.an, self.r, self.pack_int4, self.fuse = gm, an, ranges, pack_int4, fuse
        self.graph = fx.Graph()
        self.root = steps.Steps()
        self.memo: dict[tuple, fx.Node] = {}
        self.specs: dict[fx.Node, object] = {}
        self.in_grid: Grid | None = None
        self.placeholders, self.input_names = sources.placeholders(gm, self.graph)
        self.grid_input: str | None = None  # the input the grid quantizes (keyword inputs)
        self.names: dict[str, str] = {}  # step -> the model's op / module it implements
        self.op_paths: dict[str, str] = {}  # quantized op name -> its integer layer's path
        self.float_ops: list[fx.Node] = []  # float islands

    # ------------------------------------------------------------------ demands

    def demands(self, node: fx.Node) -> list[tuple]:
        """Distinct formats the consumers of ``node`` read (through shape ops), in order."""
        out: list[tuple] = []
        for user in node.users:
            for d in self._demand_of(user, node):
                if d not in out:
                    out.append(d)
        return out

    def _demand_of(self, user: fx.Node, node: fx.Node) -> list[tuple]:
        if user.op == "output":
            return [LOGITS_D]
        if not is_tensor(user):
            return []  # a shape read
        r = self.an.role.get(user)
        if r is None:  # transparent
            return self.demands(user)
        if r == "qop":
            spec = self.spec(user)
            if isinstance(spec, adapter.MatMulSpec):
                i = tensor_args(user).index(node)
                return [codes(spec.a if i == 0 else spec.b)]
            return [codes(spec.act)]
        if r == "island":
            from hawq.integer.graph.islands import FLOAT_D

            return [FLOAT_D]
        if r == "mask":
            return [ACC_D] if self.an.kind[node] == "acc" else [INDEX_D]
        if r == "add" and is_bias(user, self.an.kind):
            return [ACC_D] if self.an.kind[node] == "acc" else [("bias", user)]
        if r in ("bn", "scale") or (r == "relu" and self.an.kind[user] == "acc"):
            return [ACC_D]  # folded into the chain; materialised at its end
        if r == "gelu":
            return [("gelu", user)]
        if r == "softmax":
            return [ACC_D]
        if r in ("index", "embed"):
            return [INDEX_D]
        return [WIDE_D]  # add, cat, mean, norm, relu of the stream

    def spec(self, node: fx.Node):
        if node not in self.specs:
            name, m = module_name(node), self.gm.get_submodule(str(node.target))
            kind = type(m).__name__
            if kind == "QuantLinear":
                self.specs[node] = adapter.linear_spec(name, m)
            elif kind == "QuantMatMul":
                self.specs[node] = adapter.matmul_spec(name, m)
            else:
                bn = self._bn_after(node)
                self.specs[node] = adapter.conv_spec(name, m, bn)
        return self.specs[node]

    def _bn_after(self, node: fx.Node) -> nn.Module | None:
        users = list(node.users)
        if len(users) == 1 and self.an.role.get(users[0]) == "bn":
            return self.gm.get_submodule(str(users[0].target))
        return None

    # ------------------------------------------------------------------ accumulator chains

    def chain(self, end: fx.Node) -> tuple[fx.Node, bool, float]:
        """``(quantized op, relu, constant multiplier)`` behind an accumulator node."""
        relu, mult, node = False, 1.0, end
        while (
            self.an.role.get(node) in ("bn", "relu", "scale")
            or self._identity(node)
            or (is_bias(node, self.an.kind))
        ):
            if self._identity(node) or is_bias(node, self.an.kind):
                node = self._acc_input(node)
                continue
            r = self.an.role[node]
            if r == "relu":
                relu = True
            elif r == "scale":
                if relu:
                    raise Unsupported(f"integer conversion: {where(node)} scales after a ReLU")
                c = constant_factor(node)
                mult *= c if getattr(node.target, "__name__", node.target) == "mul" else 1.0 / c
            src = tensor_args(node)[0]
            if len(src.users) != 1:
                raise Unsupported(
                    f"integer conversion: {where(src)} is read before and after "
                    f"{where(node)}; fold it into one consumer"
                )
            node = src
        if self.an.role.get(node) != "qop":
            raise Unsupported(f"integer conversion: {where(end)} does not read a quantized op")
        if mult <= 0:
            raise Unsupported(f"integer conversion: {where(end)}: a non-positive scale {mult}")
        return node, relu, mult

    def _acc_input(self, node: fx.Node) -> fx.Node:
        """The input an identity module or a bias add passes the accumulator through."""
        ins = tensor_args(node)
        return next((a for a in ins if self.an.kind.get(a) == "acc"), ins[0])

    def _identity(self, node: fx.Node) -> bool:
        """A module that returns its input in eval mode (Dropout, Identity: a folded BN)."""
        return (
            node.op == "call_module"
            and node not in self.an.role
            and isinstance(self.gm.get_submodule(str(node.target)), nn.Dropout | nn.Identity)
        )

    def acc_scale(self, op: fx.Node, mult: float) -> torch.Tensor:
        spec = self.spec(op)
        if isinstance(spec, adapter.MatMulSpec):
            return torch.tensor(spec.a.scale * spec.b.scale * mult, dtype=torch.float64)
        return spec.act.scale * spec.scale * mult

    def requant_to(self, scale, demand: tuple, relu: bool) -> IntRequant:
        """The requantiser from real scale ``scale`` onto the format ``demand``."""
        r = self.r
        if demand[0] == "codes":
            return IntRequant.to_grid(scale, demand[1], relu)
        if demand == WIDE_D:
            lo, hi = (0, r.limit) if relu else (-WIDE, WIDE)
            return IntRequant(scale / r.s_r, 0, lo, hi, torch.int32)
        if demand[0] == "gelu":
            g_max = 2 ** (GELU_BITS - 1) - 1
            return IntRequant(
                scale / r.gelu[demand[1]], 0, 0 if relu else -g_max, g_max, torch.int32
            )
        if demand == LOGITS_D:
            l_max = 2 ** (LOGIT_BITS - 1) - 1
            return IntRequant(scale / r.logit_scale, 0, 0 if relu else -l_max, l_max, torch.int32)
        raise Unsupported(f"integer conversion: no requantisation onto {demand[0]}")

    # ------------------------------------------------------------------ graph building

    def add_step(self, module: nn.Module, args: tuple, name: str, op: str) -> fx.Node:
        key = name.replace(".", "_")
        i = 0
        while hasattr(self.root, key if not i else f"{key}_{i}"):
            i += 1
        key = key if not i else f"{key}_{i}"
        self.root.add_module(key, module)
        self.names[key] = op
        return self.graph.call_module(key, args)

    def const(self, t: torch.Tensor, name: str) -> fx.Node:
        key = "const_" + name.replace(".", "_")
        self.root.register_buffer(key, t)
        return self.graph.get_attr(key)

    def emit(self, node: fx.Node, demand: tuple) -> fx.Node:
        """The new-graph node holding ``node``'s value in format ``demand``."""
        key = (node, demand)
        if key not in self.memo:
            self.memo[key] = self._emit(node, demand)
        return self.memo[key]

    def _emit(self, node: fx.Node, demand: tuple) -> fx.Node:
        kind = self.an.kind[node]
        if kind == "island" or (
            demand == ("float",)
            and node.op != "placeholder"
            and (node in self.an.role or node.op == "get_attr")
        ):
            from hawq.integer.graph import islands

            if kind == "island":
                return islands.value(self, node, demand)
            return islands.dequantized(self, node, kind)
        if kind == "index":
            return sources.index_value(self, node, demand)
        if node.op == "placeholder":
            return sources.model_input(self, node, demand)
        if node.op == "get_attr":
            return sources.parameter(self, node, demand)
        if node not in self.an.role:  # shape op: replay on the materialised input
            from hawq.integer.graph import attention

            m = attention.match(self, node) if demand[0] == "codes" else None
            if m is not None:
                return attention.fused(self, m, demand)
            src = tensor_args(node)[0]
            if node.op == "call_module" or node.target is F.dropout:  # identity in eval
                return self.emit(src, demand)
            return self.graph.node_copy(
                node, lambda a: self.emit(a, demand) if a is src else self.arg(a)
            )
        if kind == "acc" and is_bias(node, self.an.kind):
            return self._bias(node, demand)
        if kind == "acc":
            return self._acc(node, demand)
        from hawq.integer.graph import materialize

        return materialize.value(self, node, kind, demand)

    def arg(self, a: fx.Node) -> fx.Node:
        """A non-demanded argument: a shape read (any materialisation has the shape)."""
        if is_tensor(a) and self.an.kind.get(a) == "index":
            return self.emit(a, INDEX_D)  # ids indexing a value (a bias table's positions)
        if is_tensor(a):
            d = self.demands(a)
            if not d:
                raise Unsupported(f"integer conversion: {where(a)} is only read for its shape")
            return self.emit(a, d[0])
        if a.op == "get_attr":
            raise Unsupported(f"integer conversion: {where(a)}: a non-tensor attribute")
        return self.graph.node_copy(a, self.arg)

    def _acc(self, end: fx.Node, demand: tuple) -> fx.Node:
        ds = self.demands(end)
        if WIDE_D in ds and demand != WIDE_D:  # one residual copy; the rest read from it
            from hawq.integer.graph import materialize

            return materialize.from_wide(self, self.emit(end, WIDE_D), demand, end)
        op, relu, mult = self.chain(end)
        if demand == ACC_D and relu:
            raise Unsupported(f"integer conversion: {where(end)}: a ReLU before softmax")
        if len(ds) == 1 or demand == WIDE_D:
            if demand == ACC_D:
                return self.op_step(op, None)
            return self.op_step(op, self.requant_to(self.acc_scale(op, mult), demand, relu))
        acc = self.memo.get((op, "raw")) or self._raw(op)  # one GEMM, several requants
        if demand == ACC_D:
            return acc
        rq = self.requant_to(self.acc_scale(op, mult), demand, relu)
        dim = (
            1
            if isinstance(self.spec(op), adapter.WeightSpec) and self.spec(op).kind == "conv2d"
            else -1
        )
        return self.add_step(
            steps.Requant(rq, 0, dim), (acc,), f"{module_name(op)}.rq", module_name(op)
        )

    def _bias(self, node: fx.Node, demand: tuple) -> fx.Node:
        """Scores plus a constant bias: the raw accumulator plus the bias in its units."""
        if demand != ACC_D:
            raise Unsupported(f"integer conversion: {where(node)}: a score bias is read by softmax")
        acc = self._acc_input(node)
        (const,) = [a for a in tensor_args(node) if a is not acc]
        if self.an.role.get(node) == "mask":
            value = node.args[2] if len(node.args) > 2 else node.kwargs["value"]
            fill = float(value) / self.bias_scale(node)  # -inf: the most negative score
            fill = max(-BIAS_LIMIT, min(BIAS_LIMIT, fill)) if fill == fill else 0.0
            fill = int(round(fill))
            args = (self.emit(acc, ACC_D), self.emit(const, INDEX_D))
            return self.add_step(steps.MaskFill(fill), args, node.name, node.name)
        args = (self.emit(acc, ACC_D), self.emit(const, ("bias", node)))
        return self.add_step(steps.AddBias(), args, node.name, node.name)

    def bias_scale(self, node: fx.Node) -> float:
        """The real value of one accumulator unit where bias ``node`` is added."""
        op, _, mult = self.chain(self._acc_input(node))
        return float(self.acc_scale(op, mult))

    def _raw(self, op: fx.Node) -> fx.Node:
        self.memo[(op, "raw")] = node = self.op_step(op, None)
        return node

    def op_step(
        self,
        op: fx.Node,
        rq: IntRequant | None,
        residual: fx.Node | None = None,
        limit: int = 0,
        relu: bool = False,
        lut: torch.Tensor | None = None,
    ) -> fx.Node:
        """The quantized op as an integer step with output requantiser ``rq`` (None: int32
        accumulator) and the optional fused epilogue."""
        spec = self.spec(op)
        name = module_name(op)
        ins = [self.emit(a, d) for a, d in zip(tensor_args(op), self._operand_demands(spec))]
        if isinstance(spec, adapter.MatMulSpec):
            node = self.add_step(steps.MatMul(IntMatMul(spec, rq)), tuple(ins), name, name)
        else:
            extra = (residual,) if residual is not None else ()
            if spec.kind == "conv2d":
                layer = steps.Conv(IntConv2d(spec, rq, self.pack_int4), limit, relu)
            else:
                layer = steps.Linear(IntLinear(spec, rq, self.pack_int4), lut, limit)
            node = self.add_step(layer, (ins[0], *extra), name, name)
        self.op_paths.setdefault(name, f"{node.target}.layer")
        return node

    @staticmethod
    def _operand_demands(spec) -> list[tuple]:
        if isinstance(spec, adapter.MatMulSpec):
            return [codes(spec.a), codes(spec.b)]
        return [codes(spec.act)]
