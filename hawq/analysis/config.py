"""``landscape`` config group: which surfaces the landscape stage draws and how finely."""

from __future__ import annotations

from dataclasses import dataclass, field

from hawq.schema import require

DIRECTIONS = ("eigen", "random")


@dataclass
class LandscapeConfig:
    """Schema of ``conf/landscape/*.yaml`` (validated with :func:`hawq.config.typed`)."""

    split: str = "train"  # the training loss (the one the Hessian describes)
    batches: int = 1  # batches of the fixed probe set
    batch_size: int = 256
    directions: list[str] = field(default_factory=lambda: ["eigen", "random"])
    eigen_op: str | None = None  # None: whole model; an op name: that op's block
    eig_method: str = "lanczos"  # lanczos | power
    eig_tol: float = 1e-3
    eig_max_iter: int = 50
    points_1d: int = 41
    points_2d: int = 21  # 0: no 2D surfaces
    span_random: float = 1.0  # filter-normalised axes cover [-span, span]
    eigen_rise: float = 1.0  # eigen axes: 0.5 |lambda| r^2 = eigen_rise
    cover_quant: bool = True  # widen an axis to reach the quantized weights' coordinate
    bits: list[int] = field(default_factory=lambda: [4, 2])
    a_bits: int | None = None  # None: weights-only fake quant
    granularity: str = "per_channel"
    run_ptq: bool = True  # add the run's ptq_model.pt when present
    per_op: bool = True
    per_op_eig_iter: int = 0  # >0: Lanczos per op; else eigenvalues from hessian.json
    quant_path_points: int = 21
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.split in ("train", "test"), "split", self.split, "train, test")
        require(self.batches >= 1, "batches", self.batches, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(
            len(self.directions) >= 1 and set(self.directions) <= set(DIRECTIONS),
            "directions",
            self.directions,
            "a non-empty list of eigen, random",
        )
        require(
            self.eig_method in ("lanczos", "power"), "eig_method", self.eig_method, "lanczos, power"
        )
        require(self.eig_tol > 0, "eig_tol", self.eig_tol, "> 0")
        require(self.eig_max_iter >= 2, "eig_max_iter", self.eig_max_iter, "an integer >= 2")
        require(self.points_1d >= 3, "points_1d", self.points_1d, "an integer >= 3")
        require(
            self.points_2d == 0 or self.points_2d >= 3,
            "points_2d",
            self.points_2d,
            "0 or an integer >= 3",
        )
        require(self.span_random > 0, "span_random", self.span_random, "> 0")
        require(self.eigen_rise > 0, "eigen_rise", self.eigen_rise, "> 0")
        require(
            all(isinstance(b, int) and 1 <= b <= 8 for b in self.bits),
            "bits",
            self.bits,
            "a list of integers 1-8",
        )
        require(
            self.a_bits is None or 1 <= self.a_bits <= 8,
            "a_bits",
            self.a_bits,
            "null or an integer 1-8",
        )
        require(
            self.per_op_eig_iter >= 0, "per_op_eig_iter", self.per_op_eig_iter, "an integer >= 0"
        )
        require(
            self.quant_path_points >= 2,
            "quant_path_points",
            self.quant_path_points,
            "an integer >= 2",
        )
