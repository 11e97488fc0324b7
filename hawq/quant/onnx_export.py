"""Export a fake-quant model to ONNX in QDQ form (``QuantizeLinear``/``DequantizeLinear``).

:func:`export_onnx` copies the model, replaces every :class:`~hawq.quant.quantizer.Quantizer`
by a :class:`QDQ` module that computes the same grid with
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
(fixed, calibrated or learned qparams read once), and traces it with the TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``), which maps each of those ops to one
``QuantizeLinear`` + ``DequantizeLinear`` pair (opset >= 13; per-channel scales use the
``axis`` attribute). The ``dynamo`` exporter of torch 2.13 translates the same ops, but it
needs torch >= 2.5 and re-exports at opset 18; the TorchScript path works for every torch
this project supports.

Grids narrower than 8 bits. ONNX QDQ stores int8 (``[-128, 127]``) or uint8 (``[0, 255]``)
only and the exporter rejects any other ``(quant_min, quant_max)``. A ``b``-bit grid
``[q_min, q_max]`` with scale ``s`` and zero point ``z`` (2 <= b <= 8, or an 8-bit grid
that is not the full storage range, e.g. PACT's ``[-127, 127]``) is therefore written as::

    Clip(x, (q_min - z) s, (q_max - z) s) -> QuantizeLinear(s, z, int8|uint8) -> DequantizeLinear

The clip bounds are the real values of the grid's end points, so ``round(clip(x) / s) + z``
lies in ``[q_min, q_max]``: the int8/uint8 tensor between the Q and DQ nodes holds exactly the
``b``-bit codes and the Q/DQ pair stays adjacent (the pattern QDQ runtimes fuse). Per-tensor
bounds are one ``Clip``; per-channel bounds are ``Max``/``Min`` against constant
``(C, 1, ...)`` tensors. Signed grids are stored as int8, unsigned ones (after ReLU/GELU
calibration, asymmetric grids) as uint8.

Learned qparams: LSQ exports ``|s|`` clamped as in training; LSQ+ exports
``DQ(Q(x - beta)) + beta`` (zero point 0, its real offset as ``Sub``/``Add``); PACT exports
the grid ``s = alpha / n`` on ``[-n, n]`` (signed) or ``[0, n]``.

Weights (``weights="int8"``, the default). The trace quantizes every weight at run time:
float initializer ``[-> Clip | Max/Min] -> QuantizeLinear``. The exporter's constant folding
computes BatchNorm folding and LSQ+'s ``W - beta`` but neither ``QuantizeLinear`` nor
``Max``/``Min`` (nor does onnxscript's optimizer fold ``QuantizeLinear``).
:func:`quantize_weights` evaluates each such constant chain once, with ONNX's own semantics
(:mod:`onnx.reference`)::

    q = saturate(round_half_even(clip(W) / s) + z)      (s, z broadcast along ``axis``)

and stores ``q`` as an int8/uint8 initializer read by the ``DequantizeLinear`` directly: the
form ONNX Runtime and TensorRT take for quantized weights, 4x smaller than float weights (the
tiny ViT's file: 2.5x). ``q`` equals, bit for bit, the tensor ORT computed from the float
form, so outputs do not change. ``weights="float"`` keeps the traced form.

Not exportable (one :class:`~hawq.errors.HawqError` line naming the quantizer): dynamic
ranges, float formats (fp8, nf4, mx), per-group weights, 1-bit and > 8-bit grids,
quantizers still observing or never calibrated.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.errors import HawqError, choices
from hawq.io import write_bytes
from hawq.models.ops import as_logits
from hawq.quant.learnable import pact_levels
from hawq.quant.onnx_graph import prune
from hawq.quant.onnx_int8 import ort_int8_form
from hawq.quant.quantizer import MIN_SCALE, Quantizer

Tensor = torch.Tensor
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
WEIGHT_FORMS = ("int8", "float")
FOLDABLE = {"Constant", "Identity", "Clip", "Min", "Max", "Sub"}  # ops of a weight's chain


class QDQ(nn.Module):
    """Export form of one quantizer: ``[clip ->] fake_quantize (int8/uint8) [+ offset]``.

    Args:
        scale: 0-d (per tensor) or 1-d (per channel along ``axis``) positive scales.
        zero_point: integer zero point(s), same shape as ``scale``.
        q_min: lowest code of the grid.
        q_max: highest code of the grid.
        axis: channel axis of a per-channel grid; None for per tensor.
        offset: LSQ+ real offset ``beta`` (shaped like ``scale``), subtracted before and
            added after; or None.
    """

    def __init__(
        self,
        scale: Tensor,
        zero_point: Tensor,
        q_min: int,
        q_max: int,
        axis: int | None = None,
        offset: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.q_min, self.q_max, self.axis = int(q_min), int(q_max), axis
        self.store = (-128, 127) if q_min < 0 else (0, 255)  # int8 / uint8 storage
        self.clip = (self.q_min, self.q_max) != self.store
        scale = scale.detach().float()
        zero_point = zero_point.detach().float()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.round().to(torch.int32))
        self.register_buffer("offset", None if offset is None else offset.detach().float())
        lo, hi = (q_min - zero_point) * scale, (q_max - zero_point) * scale
        if axis is not None:  # (C,) -> (1, .., C, .., 1) is set at the first forward's rank
            self.register_buffer("lo", lo)
            self.register_buffer("hi", hi)
        else:
            self.lo, self.hi = float(lo), float(hi)
            self.s, self.z = float(scale), int(self.zero_point)  # traced as constants

    def extra_repr(self) -> str:
        return f"grid=[{self.q_min}, {self.q_max}], axis={self.axis}, clip={self.clip}"

    def _channels(self, t: Tensor, x: Tensor) -> Tensor:
        """A per-channel ``(C,)`` tensor shaped to broadcast along ``axis`` of ``x``."""
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        offset = self.offset
        if offset is not None:
            offset = self._channels(offset, x) if offset.dim() else offset
            x = x - offset
        if self.axis is None:
            if self.clip:
                x = torch.clamp(x, self.lo, self.hi)
            out = torch.fake_quantize_per_tensor_affine(x, self.s, self.z, *self.store)
        else:
            if self.clip:
                x = torch.minimum(
                    torch.maximum(x, self._channels(self.lo, x)), self._channels(self.hi, x)
                )
            out = torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, *self.store
            )
        return out if offset is None else out + offset


def to_qdq(q: Quantizer, name: str) -> nn.Module:
    """The :class:`QDQ` module computing ``q``'s grid; ``nn.Identity`` for a switched-off one.

    Raises:
        HawqError: ``q`` has no QDQ form (see the module docstring).
    """
    if q.mode == "off":
        return nn.Identity()

    def fail(why: str) -> HawqError:
        return HawqError(f"cannot export {name} to ONNX QDQ: {why}")

    if q.mode != "quant":
        raise fail("it is still observing (finish calibration first)")
    if q.fmt != "int":
        raise fail(f"format {q.fmt!r} has no QuantizeLinear form (integer grids only)")
    if q.dynamic:
        raise fail("dynamic ranges are computed per input; export needs static qparams")
    if not bool(q.ready):
        raise fail("it was never calibrated")
    if not 2 <= q.bits <= 8:
        raise fail(f"{q.bits}-bit grids are not representable (QDQ stores int8/uint8; 2-8 bits)")
    if q.granularity == "per_group" and q.is_weight:
        raise fail("per-group scales need blocked QuantizeLinear (opset 21); use per_channel")
    offset = None
    q_min, q_max = q.q_min, q.q_max
    if q.learn == "pact":
        n = pact_levels(q.bits, q.signed)
        scale = q.alpha.detach() / n
        zero = torch.zeros_like(scale)
        q_min, q_max = (-n if q.signed else 0), n
    elif q.learn in ("lsq", "lsqplus"):
        scale = q.scale.detach().abs().clamp(min=MIN_SCALE)
        zero = (
            torch.zeros_like(scale)
            if q.learn == "lsqplus" or q._zero(q.zero_point) is None
            else q.zero_point
        )
        offset = q.offset.detach() if q.learn == "lsqplus" else None
    else:
        scale = q.scale.detach()
        zero = q.zero_point if q._zero(q.zero_point) is not None else torch.zeros_like(scale)
    if not torch.equal(zero, zero.round()):
        raise fail("its zero point is not an integer")
    if scale.numel() == 1:
        return QDQ(
            scale.reshape(()),
            zero.reshape(()),
            q_min,
            q_max,
            None,
            None if offset is None else offset.reshape(()),
        )
    axes = [d for d, n in enumerate(scale.shape) if n > 1]
    if len(axes) != 1:
        raise fail(f"scale of shape {tuple(scale.shape)} is not per tensor or per channel")
    return QDQ(
        scale.flatten(),
        zero.expand_as(scale).flatten(),
        q_min,
        q_max,
        axes[0],
        None if offset is None else offset.expand_as(scale).flatten(),
    )


def qdq_model(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` in eval mode with every :class:`Quantizer` replaced by its QDQ form."""
    model = copy.deepcopy(getattr(qmodel, "_orig_mod", qmodel)).eval()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if not found:
        raise HawqError("cannot export to ONNX QDQ: the model has no quantizers (run quantize_)")
    for name, q in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, to_qdq(q, name))
    return model


def _onnx() -> Any:
    """The ``onnx`` module (optional: the ``dev`` extra)."""
    try:
        import onnx
    except ImportError:
        raise HawqError(
            "int8 ONNX weights need the onnx package: pip install onnx "
            "(or export_onnx(..., weights='float'))"
        ) from None
    return onnx


def _source(name: str, producer: dict[str, Any]) -> str:
    """The initializer (or ``Constant`` output) a constant chain starts from (first inputs)."""
    while name in producer and producer[name].op_type != "Constant":
        name = producer[name].input[0]
    return name


def _module_path(node_name: str) -> str:
    """The module path in a TorchScript node name: ``/layer1/layer1.0/conv1/w_quant/Op`` ->
    ``layer1.0.conv1.w_quant`` (a numbered child's scope repeats its parent's name)."""
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts.pop()
        parts.append(seg)
    return ".".join(parts)


def _code_name(node: Any, producer: dict[str, Any], taken: set[str]) -> str:
    """``<weight>_quantized`` for the codes of QuantizeLinear ``node``, unique in ``taken``.

    A weight the exporter computed (BatchNorm folded in, LSQ+ ``W - beta``) has an ``onnx::``
    name only; the quantizer's path (:func:`_module_path`) stands in:
    ``conv1.w_quant_quantized``.
    """
    src = _source(node.input[0], producer)
    if src.startswith("onnx::") and node.name.startswith("/"):
        src = _module_path(node.name)
    name, k = f"{src}_quantized", 1
    while name in taken:
        name, k = f"{src}_quantized_{k}", k + 1
    return name


def _evaluate(model: Any, nodes: list[Any], producer: dict[str, Any]) -> list[Any]:
    """First outputs of ``nodes`` (constant QuantizeLinears), by :mod:`onnx.reference`: one
    graph of the nodes they depend on, with ONNX's semantics (opsets of ``model``)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    need, stack = set(), [n.input for n in nodes]
    while stack:
        for name in stack.pop():
            if name in producer and name not in need:
                need.update(producer[name].output)
                stack.append(producer[name].input)
    chain = [n for n in model.graph.node if set(n.output) & need] + nodes
    read = {name for n in chain for name in n.input}
    outputs = [onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in nodes]
    consts = [t for t in model.graph.initializer if t.name in read]
    graph = onnx.helper.make_graph(chain, "weights", [], outputs, consts)
    sub = onnx.helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    return ReferenceEvaluator(sub).run(None, {})


def quantize_weights(model: Any) -> Any:
    """Store every QuantizeLinear of a constant as its integer codes (``model``, in place).

    A QuantizeLinear is constant when all its inputs are: initializers that are not graph
    inputs, ``Constant`` outputs, or outputs of :data:`FOLDABLE` nodes of constants (a weight's
    ``Clip``/``Max``/``Min``/``Sub``). Its output ``saturate(round_half_even(x / s) + z)``
    becomes an int8/uint8 initializer (dtype of ``z``) named by :func:`_code_name`; the
    QuantizeLinear and the chain behind it go, and ``onnx.checker`` (with shape inference)
    checks the result.
    """
    import onnx

    graph = model.graph
    const = {t.name for t in graph.initializer} - {i.name for i in graph.input} | {""}
    for node in graph.node:
        if node.op_type in FOLDABLE and const.issuperset(node.input):
            const.update(node.output)
    targets = [n for n in graph.node if n.op_type == "QuantizeLinear" and const.issuperset(n.input)]
    producer = {o: n for n in graph.node for o in n.output}
    taken = {t.name for t in graph.initializer} | set(producer)
    renames = {}
    for node, codes in zip(targets, _evaluate(model, targets, producer)):
        renames[node.output[0]] = name = _code_name(node, producer, taken)
        taken.add(name)
        graph.initializer.append(onnx.numpy_helper.from_array(codes, name))
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    prune(graph)
    onnx.checker.check_model(model, full_check=True)
    return model


class _KeywordCall(nn.Module):
    """``model(**dict(zip(keys, args)))`` on positional tensors, returning the logits: the
    exporter's view of a model called with keyword inputs."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args: Tensor) -> Tensor:
        return as_logits(self.model(**dict(zip(self.keys, args))))


def export_onnx(
    qmodel: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    weights: str = "int8",
) -> Path:
    """Write ``qmodel`` (a calibrated/trained fake-quant model) as a QDQ ONNX file.

    Args:
        qmodel: model with :class:`Quantizer` modules (after ``quantize_`` + calibration/QAT).
        example_input: one input batch (a tuple of positional inputs, or a dict of keyword
            inputs: token ids, attention masks) on the model's device.
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset, >= 13 (per-channel QDQ).
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        weights: ``"int8"``: quantized weights as int8/uint8 initializers read by
            DequantizeLinear (:func:`quantize_weights`; needs ``onnx``); ``"float"``: float
            weights quantized in the graph, as traced.

    Returns:
        ``path``. The graph's inputs are ``input`` (``input_<i>`` for several, the keys of a
        dict), its output ``output`` (the logits of a ``ModelOutput``).

    Raises:
        HawqError: a quantizer has no QDQ form, ``opset`` < 13, an unknown ``weights``, or
            ``weights="int8"`` without ``onnx``.
    """
    if opset < MIN_OPSET:
        raise HawqError(f"ONNX opset {opset} < {MIN_OPSET}: per-channel QDQ needs opset >= 13")
    if weights not in WEIGHT_FORMS:
        raise HawqError(f"ONNX weights={weights!r}: expected one of {choices(WEIGHT_FORMS)}")
    onnx = _onnx() if weights == "int8" else None
    model = qdq_model(qmodel)
    if isinstance(example_input, Mapping):  # keyword inputs: graph inputs named by their keys
        model, names = _KeywordCall(model, list(example_input)), list(example_input)
        args = tuple(example_input.values())
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
    kwargs = (
        {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    )
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            args,
            buf,
            input_names=names,
            output_names=["output"],
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
            **kwargs,
        )
    data = buf.getvalue()
    if onnx is not None:
        model = ort_int8_form(quantize_weights(onnx.load_from_string(data)))
        data = model.SerializeToString()
    return write_bytes(Path(path), data)
