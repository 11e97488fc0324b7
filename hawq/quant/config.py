"""Typed views of the ``quant`` and ``qat`` config groups, and plan resolution."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawq.errors import HawqError
from hawq.quant.plan import DEFAULT_KEY, OpSetting, Plan, load_plan
from hawq.quant.reconstruct import ReconstructSettings
from hawq.schema import require

log = logging.getLogger("hawq")

BITS_FILE = "bits.yaml"  # written by the alloc stage into the run directory


@dataclass
class ReconstructConfig(ReconstructSettings):
    """``quant.reconstruct``: block reconstruction after calibration (hawq.quant.reconstruct)."""

    enabled: bool = False

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"reconstruct.{e}") from None


@dataclass
class QuantConfig:
    """``quant`` group: the default op setting, an optional plan file, calibration."""

    default: Any = field(default_factory=dict)  # the plan's _default OpSetting (validated)
    plan: str | None = None  # a bits.yaml (wins over the run's bits.yaml), or "default"
    calib_batches: int = 8  # calibration batches of the (unaugmented) train split
    calib_batch_size: int = 256
    fold_bn: bool = True  # fold BN into the preceding quantized conv
    equalize: float = 0.0  # LayerNorm -> Linear channel equalization strength (hawq.quant.equalize)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)

    def __post_init__(self) -> None:
        require(self.calib_batches >= 1, "calib_batches", self.calib_batches, "an integer >= 1")
        require(0.0 <= self.equalize <= 1.0, "equalize", self.equalize, "a number in [0, 1]")
        require(
            self.calib_batch_size >= 1, "calib_batch_size", self.calib_batch_size, "an integer >= 1"
        )


@dataclass
class QATConfig:
    """``qat`` group: the quantization-aware training recipe."""

    epochs: int = 30
    method: str = "lsq"  # lsq | lsqplus | pact | ste
    lr: float = 1.0e-5  # weights (fine-tuning a trained model: small)
    qparam_lr: float = 1.0e-3  # step sizes and clips: relative change per step (log space)
    qparam_space: str = "log"  # log: Adam on log s (s stays > 0) | linear: Adam on s (old)
    refit_on_drop: bool = True  # progressive schedule: re-fit qparams at each new width
    reconstruct_on_drop: bool = False  # then block reconstruction (quant.reconstruct settings)
    weight_decay: float = 0.0
    schedule: list[int] | None = None  # progressive floor bits, e.g. [8, 4, 3, 2]
    epochs_per_step: int = 1  # epochs at each schedule step but the last (it takes the rest)
    freeze_bn_epoch: int | None = 2  # freeze folded-BN statistics from this epoch; null = never
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: bool = True
    label_smoothing: float = 0.0
    compile: bool = False  # torch.compile the training model (fuses the fake quantizers)
    init: str | None = None  # a quantized checkpoint (e.g. a reconstructed PTQ) to start from
    distill: float = 0.0  # weight of KL to the FP teacher (hawq.quant.distill); 0 = plain CE
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        require(
            self.method in ("lsq", "lsqplus", "pact", "ste"),
            "method",
            self.method,
            "lsq, lsqplus, pact, ste",
        )
        require(self.lr >= 0 and self.qparam_lr >= 0, "lr", self.lr, ">= 0")
        require(
            self.qparam_space in ("log", "linear"), "qparam_space", self.qparam_space, "log, linear"
        )
        require(self.epochs_per_step >= 1, "epochs_per_step", self.epochs_per_step, ">= 1")
        require(0.0 <= self.distill <= 1.0, "distill", self.distill, "a weight in [0, 1]")
        require(
            not (self.distill > 0 and self.compile),
            "distill",
            self.distill,
            "0 with qat.compile=true (the teacher reads the batch through a forward hook)",
        )
        require(
            self.refit_on_drop or not self.reconstruct_on_drop,
            "reconstruct_on_drop",
            self.reconstruct_on_drop,
            "false without qat.refit_on_drop",
        )
        require(
            not (self.init and self.schedule),
            "init",
            self.init,
            "null with qat.schedule (a progressive run starts wider than the checkpoint)",
        )
        require(
            self.distill_temperature > 0, "distill_temperature", self.distill_temperature, "> 0"
        )
        require(
            0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            "0 <= warmup_epochs < epochs",
        )
        if self.schedule is not None:
            s = list(self.schedule)
            ok = len(s) >= 1 and all(1 <= b <= 8 for b in s)
            ok = ok and all(s[i] >= s[i + 1] for i in range(len(s) - 1))
            require(ok, "schedule", self.schedule, "null or non-increasing bits in 1-8")

    def floor_bits(self, epoch: int) -> int | None:
        """Progressive schedule: the bit floor in ``epoch`` (0-based); None without schedule."""
        if not self.schedule:
            return None
        return self.schedule[min(epoch // self.epochs_per_step, len(self.schedule) - 1)]


DEFAULT_PLAN = "default"  # quant.plan value: quant.default, whatever bits.yaml says


def resolve_plan(qc: QuantConfig, run_dir: Path) -> tuple[Plan, str]:
    """``quant.plan`` if set, else the run's ``bits.yaml``, else ``quant.default``.
    ``quant.plan=default`` takes ``quant.default`` even where a ``bits.yaml`` exists (the
    command line sets it when ``quant.default`` bits are given explicitly: ``hawq.run``).

    Returns ``(plan, source)`` with source the file path or ``quant.default``.
    """
    if qc.plan == DEFAULT_PLAN:
        if (run_dir / BITS_FILE).is_file():
            log.warning(
                "quant.plan=default (quant.default bits given explicitly): %s is not "
                "used; quant.plan=%s would use it",
                run_dir / BITS_FILE,
                run_dir / BITS_FILE,
            )
        return Plan(default_setting(qc.default)), "quant.default"
    if qc.plan:
        path = Path(qc.plan).expanduser()
        if not path.is_file():
            raise HawqError(f"quant.plan={qc.plan}: no such file")
        return load_plan(path)[0], str(path.resolve())
    path = run_dir / BITS_FILE
    if path.is_file():
        return load_plan(path)[0], str(path)
    return Plan(default_setting(qc.default)), "quant.default"


def default_setting(default: Any) -> OpSetting:
    """The ``quant.default`` mapping as a validated :class:`OpSetting` (one-line errors name
    ``quant.default.<key>``); ``None`` gives the built-in defaults."""
    if default is not None and not isinstance(default, dict):
        from omegaconf import OmegaConf

        default = OmegaConf.to_container(default, resolve=True)
    try:
        return Plan.from_dict({DEFAULT_KEY: dict(default or {})}, where="plan").default
    except HawqError as e:
        raise HawqError(str(e).replace(f"plan.{DEFAULT_KEY}", "quant.default")) from e
