"""Candidate settings an op may take: bit widths and value formats of its two operands.

A :class:`Candidate` is the part of an :class:`~hawq.quant.plan.OpSetting` the
allocator chooses (``w_bits``, ``a_bits`` and their formats); everything else
(granularity, symmetry, calibrator) comes from a base setting.

For a ``matmul`` op (``a @ b`` of two activations) ``a_bits`` applies to both
operands and the weight fields mean nothing, so its candidates are the distinct
activation settings, written with ``w_bits = a_bits`` (both operands of the
product run at that precision; the BOPs and INT4-share models read them so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hawq.errors import HawqError, choices
from hawq.quant.plan import FORMATS, OpSetting

FP_BITS = 32  # an operand left in floating point counts as 32 bits in every cost model


@dataclass(frozen=True)
class Candidate:
    """Bits and formats of one op's weight and activation operands (None = floating point)."""

    w_bits: int | None
    a_bits: int | None
    w_format: str = "int"
    a_format: str = "int"

    def __post_init__(self) -> None:
        for key in ("w_bits", "a_bits"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8):
                raise HawqError(
                    f"candidate {key}={v!r} is invalid; allowed: an integer 1-8 or null"
                )
        for key in ("w_format", "a_format"):
            if getattr(self, key) not in FORMATS:
                raise HawqError(
                    f"candidate {key}={getattr(self, key)!r} is invalid; "
                    f"allowed: {choices(FORMATS)}"
                )

    @classmethod
    def parse(cls, entry: Mapping[str, Any] | Candidate, where: str = "candidate") -> Candidate:
        """From ``{w_bits, a_bits, w_format?, a_format?}``."""
        if isinstance(entry, Candidate):
            return entry
        if not isinstance(entry, Mapping):
            raise HawqError(f"{where}: expected a mapping with w_bits and a_bits, got {entry!r}")
        unknown = set(entry) - {"w_bits", "a_bits", "w_format", "a_format"}
        if unknown:
            raise HawqError(
                f"{where}: unknown key(s) {choices(unknown)}; "
                "allowed: a_bits, a_format, w_bits, w_format"
            )
        try:
            return cls(**{k: entry[k] for k in entry})
        except HawqError as e:
            raise HawqError(f"{where}: {e}") from e

    @property
    def key(self) -> str:
        """Short name: ``w4a8``; non-int formats follow the bits (``w4nf4a8``); FP is ``fp``."""

        def one(prefix: str, bits: int | None, fmt: str) -> str:
            if bits is None:
                return f"{prefix}fp"
            return f"{prefix}{bits}" + ("" if fmt == "int" else fmt)

        return one("w", self.w_bits, self.w_format) + one("a", self.a_bits, self.a_format)

    @property
    def a_level(self) -> tuple[int | None, str]:
        """What ops that read the same tensor must agree on: activation bits and format."""
        return (self.a_bits, self.a_format if self.a_bits is not None else "int")

    def operand_bits(self, kind: str) -> tuple[int, int]:
        """Bits of the two multiplied operands (FP counts :data:`FP_BITS`)."""
        a = FP_BITS if self.a_bits is None else self.a_bits
        if kind == "matmul":
            return a, a
        w = FP_BITS if self.w_bits is None else self.w_bits
        return w, a

    def max_bits(self, kind: str) -> int:
        """The wider operand: the precision the product runs at."""
        return max(self.operand_bits(kind))

    def for_kind(self, kind: str) -> Candidate:
        """The canonical form for an op kind (matmul: weight fields copy the activation's)."""
        if kind == "matmul":
            return replace(self, w_bits=self.a_bits, w_format=self.a_format)
        return self

    def to_setting(self, base: OpSetting) -> OpSetting:
        """``base`` with this candidate's bits and formats."""
        return replace(
            base,
            w_bits=self.w_bits,
            a_bits=self.a_bits,
            w_format=self.w_format,
            a_format=self.a_format,
        )


def parse_candidates(entries: Iterable[Mapping[str, Any] | Candidate]) -> list[Candidate]:
    """Validate a list of candidate settings (duplicates removed, order kept)."""
    out: list[Candidate] = []
    for i, e in enumerate(entries):
        c = Candidate.parse(e, where=f"alloc.candidates[{i}]")
        if c not in out:
            out.append(c)
    if not out:
        raise HawqError("alloc.candidates is empty; allowed: a list of {w_bits, a_bits} settings")
    return out


def op_candidates(kind: str, candidates: list[Candidate]) -> list[Candidate]:
    """The distinct candidates of one op kind, in the given order."""
    out: list[Candidate] = []
    for c in candidates:
        c = c.for_kind(kind)
        if c not in out:
            out.append(c)
    return out
