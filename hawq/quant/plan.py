"""Quantization plans: per-op settings keyed by op name, read from / written to ``bits.yaml``.

A plan maps op names (module names from :func:`hawq.models.quantizable_ops`) to
an :class:`OpSetting`; the ``_default`` entry applies to every op the plan does
not name. Op entries may be partial: missing keys come from ``_default``. An op
whose effective ``w_bits`` and ``a_bits`` are both null stays floating point.

``bits.yaml`` layout::

    plan:
      _default: {w_bits: 8, a_bits: 8, w_format: int, ...}
      blocks.0.attn.qkv: {w_bits: 4, a_bits: 4}
    meta:            # free-form provenance: objective, budget, solver, source hessian.json
      method: hawq_v3
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hawq.errors import HawqError, choices
from hawq.io import read_yaml, write_yaml

#: Value formats. "int" is uniform integer; the others are fake-quant float formats.
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "nf4", "mxfp4", "mxint8")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
CALIBRATORS = ("minmax", "ema_minmax", "percentile", "mse", "entropy")
DEFAULT_KEY = "_default"


@dataclass(frozen=True)
class OpSetting:
    """How one op is quantized.

    Attributes:
        w_bits: weight bits (1-8; 1 = sign only) or None for FP weights.
        a_bits: bits of each activation operand (1-8) or None for FP activations.
        w_format / a_format: one of :data:`FORMATS`.
        granularity: weight granularity, one of :data:`GRANULARITIES`.
        group_size: elements per group along the input dim for ``per_group``.
        symmetric: weights symmetric (zero point 0) when True.
        a_symmetric: activations symmetric when True, affine (zero point) when False.
        calibrator: activation range calibrator, one of :data:`CALIBRATORS`.
        dynamic: activation ranges from each batch (no calibration) when True.
    """

    w_bits: int | None = 8
    a_bits: int | None = 8
    w_format: str = "int"
    a_format: str = "int"
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    a_symmetric: bool = False
    calibrator: str = "minmax"
    dynamic: bool = False

    def __post_init__(self) -> None:
        for key in ("w_bits", "a_bits"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8):
                raise HawqError(f"{key}={v!r} is invalid; allowed: an integer 1-8 or null")
        enums = (
            ("w_format", FORMATS),
            ("a_format", FORMATS),
            ("granularity", GRANULARITIES),
            ("calibrator", CALIBRATORS),
        )
        for key, allowed in enums:
            v = getattr(self, key)
            if v not in allowed:
                raise HawqError(f"{key}={v!r} is invalid; allowed: {choices(allowed)}")
        for key in ("symmetric", "a_symmetric", "dynamic"):
            v = getattr(self, key)
            if not isinstance(v, bool):  # 'false' would read as True
                raise HawqError(f"{key}={v!r} is invalid; allowed: true or false (a boolean)")
        for key in ("w_format", "a_format", "granularity", "calibrator"):
            if not isinstance(getattr(self, key), str):
                raise HawqError(f"{key}={getattr(self, key)!r} is invalid; allowed: a string")
        if (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or self.group_size < 1
        ):
            raise HawqError(f"group_size={self.group_size!r} is invalid; allowed: an integer >= 1")

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_KEYS = {f.name for f in fields(OpSetting)}


def _setting(base: OpSetting, entry: Any, where: str) -> OpSetting:
    if entry is None:
        entry = {}
    if isinstance(entry, OpSetting):
        return entry
    if not isinstance(entry, Mapping):
        raise HawqError(
            f"{where}={entry!r} is invalid; allowed: a mapping of setting keys "
            f"({choices(_KEYS)}), e.g. {{w_bits: 4, a_bits: 8}}"
        )
    entry = dict(entry)
    bad = [k for k in entry if not isinstance(k, str)]
    if bad:
        raise HawqError(f"{where}: key {bad[0]!r} is not a string; allowed: {choices(_KEYS)}")
    unknown = set(entry) - _KEYS
    if unknown:
        raise HawqError(f"{where}: unknown key(s) {choices(unknown)}; allowed: {choices(_KEYS)}")
    try:
        return replace(base, **entry)
    except HawqError as e:
        raise HawqError(f"{where}: {e}") from e


@dataclass
class Plan:
    """Per-op quantization settings with a default."""

    default: OpSetting = field(default_factory=OpSetting)
    ops: dict[str, OpSetting] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, OpSetting):
            raise HawqError(
                f"plan.{DEFAULT_KEY}={self.default!r} is invalid; allowed: an "
                "OpSetting (build plans from mappings with Plan.from_dict)"
            )
        if not isinstance(self.ops, Mapping):
            raise HawqError(
                f"plan ops={self.ops!r} is invalid; allowed: a mapping of op name -> OpSetting"
            )
        for name, s in self.ops.items():
            if not isinstance(name, str) or not isinstance(s, OpSetting):
                raise HawqError(
                    f"plan.{name}={s!r} is invalid; allowed: an OpSetting (build "
                    "plans from mappings with Plan.from_dict)"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "plan") -> Plan:
        """Build from ``{"_default": {...}, "<op>": {...}}`` (op entries may be partial)."""
        if not isinstance(d, Mapping):
            raise HawqError(
                f"{where}: expected a mapping of op name -> settings, got {type(d).__name__}"
            )
        bad = [k for k in d if not isinstance(k, str)]
        if bad:
            raise HawqError(f"{where}: op name {bad[0]!r} is not a string")
        default = _setting(OpSetting(), d.get(DEFAULT_KEY), f"{where}.{DEFAULT_KEY}")
        ops = {
            name: _setting(default, entry, f"{where}.{name}")
            for name, entry in d.items()
            if name != DEFAULT_KEY
        }
        return cls(default, ops)

    def to_dict(self) -> dict[str, Any]:
        """Full settings for the default; only the differing keys for each op."""
        out: dict[str, Any] = {DEFAULT_KEY: self.default.as_dict()}
        dflt = self.default.as_dict()
        for name, s in self.ops.items():
            out[name] = {k: v for k, v in s.as_dict().items() if v != dflt[k]}
        return out

    def setting(self, op_name: str) -> OpSetting:
        """The effective setting of ``op_name``."""
        return self.ops.get(op_name, self.default)

    def check_ops(self, op_names: list[str] | set[str]) -> None:
        """Every op the plan names must exist in the model."""
        missing = [n for n in self.ops if n not in set(op_names)]
        if missing:
            raise HawqError(
                f"plan names op(s) not in the model: {choices(missing)}; "
                f"model ops: {choices(op_names)}"
            )

    def resolved(self, op_names: list[str]) -> dict[str, OpSetting]:
        """Effective setting of every op of a model, in the given order."""
        self.check_ops(op_names)
        return {n: self.setting(n) for n in op_names}


def save_plan(path: str | Path, plan: Plan, meta: dict[str, Any] | None = None) -> Path:
    """Write ``bits.yaml`` atomically: ``{plan: ..., meta: ...}``."""
    return write_yaml(path, {"plan": plan.to_dict(), "meta": meta or {}})


def load_plan(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    """Read ``bits.yaml``; returns ``(plan, meta)``. A bare op->settings mapping also works."""
    d = read_yaml(path)
    if not isinstance(d, dict):
        raise HawqError(f"{path}: not a plan (expected a mapping)")
    body = d["plan"] if "plan" in d else d
    return Plan.from_dict(body, where=str(path)), d.get("meta", {}) if "plan" in d else {}
