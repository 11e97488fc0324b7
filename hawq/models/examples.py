"""Example inputs of a prepared model: what it is traced on and what the op probes feed it.

A model's input is one tensor (an image batch, token ids) or a dict of keyword inputs
(``model(**inputs)``: ``input_ids``, ``attention_mask``, ``token_type_ids``). An
:class:`ExampleSpec` describes one sample of it, shape and dtype per input, so that any
batch of examples can be drawn again, seeded: :func:`hawq.models.own.prepared` traces on one
and stores the spec on the model (:data:`EXAMPLE_ATTR`), and every probe (op inventory,
MACs, shapes, ties) feeds the same kind of inputs, never float zeros to a model of ids.

Config form (``model.prepare.inputs``), one entry per keyword input::

    inputs:
      input_ids: {shape: [16], dtype: int64, vocab_size: 1000}   # ids from [0, vocab_size)
      attention_mask: {shape: [16], dtype: int64, fill: 1}       # a constant
      pixel_values: {shape: [3, 32, 32]}                          # float32, standard normal
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hawq.errors import HawqError

#: attribute of a prepared model holding its :class:`ExampleSpec`
EXAMPLE_ATTR = "hawq_example"
#: keys of one input's config entry
INPUT_KEYS = ("shape", "dtype", "vocab_size", "fill")


@dataclass(frozen=True)
class InputSpec:
    """One input of a sample: its shape (no batch dimension), dtype, and values: integer
    ids from ``[0, vocab_size)``, a constant ``fill``, or standard normal floats."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    vocab_size: int | None = None
    fill: float | None = None

    def draw(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        size = (batch, *self.shape)
        if self.fill is not None:
            return torch.full(size, self.fill, dtype=self.dtype)
        if self.dtype.is_floating_point:
            return torch.randn(size, generator=gen).to(self.dtype)
        return torch.randint(0, self.vocab_size, size, generator=gen, dtype=self.dtype)


@dataclass(frozen=True)
class ExampleSpec:
    """A model's inputs: one positional tensor (``keyword`` None) or keyword inputs."""

    inputs: tuple[tuple[str | None, InputSpec], ...]

    @property
    def keyword(self) -> bool:
        return self.inputs[0][0] is not None

    def make(self, batch: int, device: torch.device | str = "cpu") -> Any:
        """A seeded example batch of ``batch`` rows: a tensor or a dict of tensors."""
        gen = torch.Generator().manual_seed(0)
        drawn = {name: spec.draw(batch, gen).to(device) for name, spec in self.inputs}
        return drawn if self.keyword else drawn[None]


def input_spec(
    where: str,
    shape: Sequence[int],
    dtype: str = "float32",
    vocab_size: int | None = None,
    fill: float | None = None,
    keys: tuple[str, str] = ("shape", "dtype"),
) -> InputSpec:
    """An :class:`InputSpec` from config values; errors name ``where``.<key> (``keys``: the
    config's names of shape and dtype)."""
    kind = getattr(torch, str(dtype), None)
    if not isinstance(kind, torch.dtype) or kind.is_complex or kind == torch.bool:
        raise HawqError(
            f"bad config {where}.{keys[1]}={dtype}: allowed a torch float or integer dtype "
            "name (float32, bfloat16, int64, ...)"
        )
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if not dims or min(dims) < 1:
        raise HawqError(f"bad config {where}.{keys[0]}={shape}: allowed a list of positive sizes")
    ok_vocab = isinstance(vocab_size, int) and vocab_size >= 1
    if not kind.is_floating_point and fill is None and not ok_vocab:
        raise HawqError(
            f"bad config {where}.vocab_size={vocab_size}: an integer {keys[1]} ({dtype}) "
            "needs vocab_size >= 1 (ids drawn from [0, vocab_size)) or a constant fill"
        )
    return InputSpec(dims, kind, vocab_size if ok_vocab else None, fill)


def keyword_spec(inputs: Mapping[str, Any]) -> ExampleSpec:
    """The spec of keyword inputs from ``model.prepare.inputs`` (name -> entry)."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise HawqError(
            "bad config model.prepare.inputs: allowed a non-empty mapping of keyword inputs, "
            "e.g. {input_ids: {shape: [128], dtype: int64, vocab_size: 30522}}"
        )
    specs = []
    for name, entry in inputs.items():
        where = f"model.prepare.inputs.{name}"
        if not isinstance(entry, Mapping) or set(entry) - set(INPUT_KEYS) or "shape" not in entry:
            raise HawqError(
                f"bad config {where}={entry!r}: allowed a mapping with shape and optionally "
                f"{', '.join(INPUT_KEYS[1:])}"
            )
        specs.append((str(name), input_spec(where, **dict(entry))))
    return ExampleSpec(tuple(specs))


def example_spec(model: Any) -> ExampleSpec | None:
    """The spec a prepared model stores, or None (a model never prepared: float images)."""
    spec = getattr(model, EXAMPLE_ATTR, None)
    return spec if isinstance(spec, ExampleSpec) else None
