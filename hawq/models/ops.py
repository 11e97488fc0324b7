"""Quantizable matrix operations and their inventory.

A *quantizable op* is any module that performs a matrix product: ``nn.Linear``,
``nn.Conv2d`` and :class:`MatMul` (an activation x activation product such as
``q @ k^T`` or ``attn @ v``). Models expose every such product as a named
module so later stages (Hessian, allocation, quantization, integer kernels) can
address it by its module name, never by list position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawq.models.examples import example_spec


class MatMul(nn.Module):
    """``a @ b`` as a module, so both activation operands can be observed/quantized.

    Args (forward):
        a: (..., n, k) tensor.
        b: (..., k, m) tensor.
    Returns:
        (..., n, m) tensor.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


#: Module types that count as quantizable matrix operations.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, MatMul)


def is_quantizable(module: nn.Module) -> bool:
    """True for modules that perform a matrix product (including quantized wrappers)."""
    return isinstance(module, QUANTIZABLE_TYPES) or getattr(module, "is_quantizable_op", False)


def quantizable_ops(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every quantizable op, in registration (= network) order.

    Wrappers that mark themselves with ``is_quantizable_op = True`` (quantized
    replacements) are listed in place of the module they replaced, and their
    children are not listed again.
    """
    ops: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if name and is_quantizable(module):
            ops[name] = module
            skip_prefixes.append(name + ".")
    return ops


@dataclass(frozen=True)
class OpInfo:
    """One quantizable op: its name, kind, parameter count and MACs per input."""

    name: str
    kind: str  # "linear" | "conv2d" | "matmul"
    params: int
    macs: int

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": self.params, "macs": self.macs}


def op_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv2d"`` or ``"matmul"`` (quantized wrappers report via ``op_kind``)."""
    if isinstance(module, nn.Conv2d) or getattr(module, "op_kind", None) == "conv2d":
        return "conv2d"
    if isinstance(module, nn.Linear) or getattr(module, "op_kind", None) == "linear":
        return "linear"
    return "matmul"


def _macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    kind = op_kind(module)
    if kind == "linear":
        # every output element is an in_features-long dot product
        return output.numel() * inputs[0].shape[-1]
    if kind == "conv2d":
        weight = module.weight
        per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]  # (C_in/groups)*kh*kw
        return output.numel() * per_output
    a, _b = inputs[0], inputs[1]
    return output.numel() * a.shape[-1]


def as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on example inputs: a tensor, a tuple/list of positional
    inputs, or a dict of keyword inputs (token ids, attention masks)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def as_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, ``output.logits`` (a
    ``transformers`` ``ModelOutput``), ``output["logits"]``, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read logits from a {type(output).__name__} model output")


def call_with(model: nn.Module, example: Any) -> Any:
    """``model`` called on ``example`` (:func:`as_call`)."""
    args, kwargs = as_call(example)
    return model(*args, **kwargs)


def example_batch_size(example: Any) -> int:
    """The leading dimension of the first tensor in ``example``."""
    args, kwargs = as_call(example)
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    raise ValueError("example inputs hold no batched tensor")


def probe_ops(
    model: nn.Module,
    hook: Callable[[str, nn.Module, tuple, torch.Tensor], None],
    input_size: tuple[int, ...] = (3, 32, 32),
    batch: int = 1,
    example: Any = None,
) -> None:
    """One eval-mode, no-grad forward pass on ``example`` (any input structure:
    :func:`call_with`), or without one on ``batch`` rows of the inputs a prepared model was
    traced on (token ids, keyword inputs: :mod:`hawq.models.examples`), or else on float
    zeros of ``(batch, *input_size)``, calling ``hook(name, module, inputs, output)`` after
    every quantizable op runs (in execution order). Train mode and hooks are restored."""
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o))
        for name, module in quantizable_ops(model).items()
    ]
    p = next(model.parameters(), None)
    device = p.device if p is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            spec = example_spec(model)
            if example is None and spec is not None:
                example = spec.make(batch, device)
            if example is None:
                model(torch.zeros(batch, *input_size, device=device))
            else:
                call_with(model, example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def op_inventory(
    model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), example: Any = None
) -> list[OpInfo]:
    """List the quantizable ops in execution order with their MACs for one input.

    Args:
        model: any module; its quantizable ops are found by :func:`quantizable_ops`.
        input_size: shape of one input without the batch dimension (a float image).
        example: example inputs instead (token ids, a dict of tensors, a tuple): MACs are
            then per sample of that batch.

    Returns:
        One :class:`OpInfo` per op, ordered by first execution (ops that never run come
        last, with 0 MACs); ``macs`` counts multiply-accumulates for a single input.
    """
    ops = quantizable_ops(model)
    macs: dict[str, int] = {}  # insertion order = execution order

    def count(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        macs[name] = macs.get(name, 0) + _macs(module, inputs, output)

    probe_ops(model, count, input_size, example=example)  # one row unless example is given
    per = 1 if example is None else example_batch_size(example)
    macs = {k: v // per for k, v in macs.items()}
    infos = []
    for name in [*macs, *(n for n in ops if n not in macs)]:
        # weight and bias only: quantized wrappers also hold scales/zero points
        params = sum(
            p.numel() for n, p in ops[name].named_parameters() if n.endswith(("weight", "bias"))
        )
        infos.append(OpInfo(name, op_kind(ops[name]), params, macs.get(name, 0)))
    return infos
