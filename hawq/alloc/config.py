"""``alloc`` config group: objective, candidate settings, budgets, ties and pins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hawq.alloc.costs import AVG_BY
from hawq.alloc.ilp import BUDGET_KINDS
from hawq.alloc.sensitivity import METHODS
from hawq.schema import require


def _default_candidates() -> list[Any]:
    return [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]


@dataclass
class AllocConfig:
    """Validated view of ``cfg.alloc`` (``conf/alloc/default.yaml`` explains the keys).

    Budgets (null = off): ``avg_bits`` (weighted mean bits, see ``avg_bits_by``),
    ``size_mb`` (MB = 2^20 bytes of quantizable-op parameters), ``bops`` (G bit-ops
    per image), ``latency_us`` (from ``latency_table``), ``int4_share`` (at least
    this share of MACs at <= 4 bits).
    """

    method: str = "hawq_v3_act"  # hawq_v3: HAWQ-V3 exactly (weight-only, whole-layer ties)
    candidates: list[Any] = field(default_factory=_default_candidates)
    avg_bits: float | None = None
    size_mb: float | None = None
    bops: float | None = None
    latency_us: float | None = None
    int4_share: float | None = None
    avg_bits_by: str = "macs"
    latency_table: str | None = None
    pin_first: Any = None  # {w_bits, a_bits[, formats]} or null
    pin_last: Any = None
    pins: Any = field(default_factory=dict)  # op name -> {w_bits, a_bits}
    ties: bool = True  # derive shared-input tie groups from a traced forward pass
    tie_groups: list[Any] = field(default_factory=list)  # extra groups of op names
    base: Any = None  # OpSetting fields; None = cfg.quant.default (what ptq/qat use)
    calib_batches: int = 4  # at most calib_batches x calib_batch_size images
    calib_batch_size: int = 128
    calib_images: int = 8  # images of the first activation-error pass (one forward)
    calib_rel_se: float = 0.05  # more images while a mean's relative std. error exceeds this
    cache: bool = True  # reuse sensitivities computed from the same inputs (alloc_sens.json)
    measured_split: str = "test"
    measured_batch_size: int | None = None
    seed: int = 0
    hessian: str | None = None  # default: <run_dir>/hessian.json
    out: str = "bits.yaml"
    frontier_budget: str | None = None  # budget swept for the plot (default: first active)
    frontier_points: int = 12
    plots: bool = True  # write <out>_per_op.png and <out>_frontier.png (matplotlib: ~0.5 s)

    def __post_init__(self) -> None:
        require(self.method in METHODS, "method", self.method, ", ".join(METHODS))
        require(self.avg_bits_by in AVG_BY, "avg_bits_by", self.avg_bits_by, ", ".join(AVG_BY))
        require(self.calib_batches >= 1, "calib_batches", self.calib_batches, "an integer >= 1")
        require(
            self.calib_batch_size >= 1, "calib_batch_size", self.calib_batch_size, "an integer >= 1"
        )
        require(
            isinstance(self.calib_images, int) and self.calib_images >= 1,
            "calib_images",
            self.calib_images,
            "an integer >= 1",
        )
        require(self.calib_rel_se > 0, "calib_rel_se", self.calib_rel_se, "a number > 0")
        require(
            self.measured_split in ("train", "test"),
            "measured_split",
            self.measured_split,
            "train, test",
        )
        require(
            self.frontier_budget is None or self.frontier_budget in BUDGET_KINDS,
            "frontier_budget",
            self.frontier_budget,
            "null or " + ", ".join(BUDGET_KINDS),
        )
        require(self.frontier_points >= 0, "frontier_points", self.frontier_points, ">= 0")
        require(
            self.int4_share is None or 0 <= self.int4_share <= 1,
            "int4_share",
            self.int4_share,
            "null or 0..1",
        )
        for key in ("avg_bits", "size_mb", "bops", "latency_us"):
            v = getattr(self, key)
            require(v is None or v >= 0, key, v, "null or a number >= 0")

    @property
    def budgets(self) -> dict[str, float]:
        """The active budgets, in :data:`BUDGET_KINDS` order."""
        return {k: float(getattr(self, k)) for k in BUDGET_KINDS if getattr(self, k) is not None}
