"""Typed, validated views of the Hydra config.

Each config group has a dataclass schema. :func:`typed` merges a group's node
into its schema (so a wrong type or an unknown key is caught) and runs the
schema's ``__post_init__`` range checks; any failure becomes a one-line
:class:`~hawq.errors.HawqError` naming the key, the bad value and what is
allowed. Stages added later validate their own groups the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from hawq.errors import HawqError
from hawq.schema import check_target, require, typed  # noqa: F401 - re-exported

T = TypeVar("T")


def _conf_dir() -> Path:
    """The Hydra config groups: the repository's top-level ``conf/`` in a checkout or an
    editable install, ``hawq/conf`` in an installed wheel (setup.py ships ``conf/`` as the
    package ``hawq.conf``)."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parent / "conf"):
        if (d / "config.yaml").is_file():
            return d
    raise HawqError(f"hawq's configs are missing: no conf/config.yaml in {here} or beside it")


CONF_DIR = _conf_dir()


@dataclass
class TrainConfig:
    """``train`` group: the FP training recipe."""

    epochs: int = 200  # seed recipe: 200 epochs
    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}
    )
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None = off
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)
    compile: bool = False  # torch.compile the training model
    log_every: int = 50  # steps between loss read-backs (progress bar, NaN check)
    eval_every: int = 1  # epochs between test evaluations (the last epoch always evaluates)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        require(
            0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            "0 <= warmup_epochs < epochs",
        )
        require(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "0..1")
        require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "0..1")
        require(
            self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "null or > 0"
        )


@dataclass
class DataConfig:
    """``data`` group: where images come from and how they are batched."""

    _target_: str = "hawq.data.module.ImageData"
    name: str = "cifar10"
    root: str | None = None  # folder with cifar-10-batches-py or the npz shards
    download: bool = False  # fetch the official archive when root has nothing
    synthetic: bool = False  # use generated images when root is null
    batch_size: int = 512
    eval_batch_size: int = 1024
    augment: bool = True  # random crop (padding) + horizontal flip
    padding: int = 4
    train_subset: int | None = None  # first N train images (all when null)
    test_subset: int | None = None
    seed: int = 0  # synthetic data seed
    partial: bool = False  # accept a CIFAR-10 folder with train shards missing (never empty)
    val_size: int | None = None  # last N train images held out as split "val"

    def __post_init__(self) -> None:
        require(
            self.val_size is None or self.val_size >= 1,
            "val_size",
            self.val_size,
            "null or an integer >= 1",
        )
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(
            self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1"
        )
        require(self.padding >= 0, "padding", self.padding, "an integer >= 0")
        for key in ("train_subset", "test_subset"):
            v = getattr(self, key)
            require(v is None or v >= 1, key, v, "null or an integer >= 1")
        require(
            self.root is not None or self.synthetic,
            "root",
            self.root,
            "a folder with CIFAR-10, or data=synthetic",
        )


@dataclass
class UserDataConfig:
    """``data=custom``: the user's own datasets (:mod:`hawq.data.user`)."""

    _target_: str = "hawq.data.user.UserData"
    datasets: dict[str, Any] = field(default_factory=dict)  # a _target_ and its arguments
    name: str = "custom"
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    loss: str | None = None  # dotted name of a loss (fn(logits, labels) or nn.Module class)

    def __post_init__(self) -> None:
        target = self.datasets.get("_target_")
        require(
            bool(target) and target != "???",
            "datasets._target_",
            target,
            "a function or class returning {'train': Dataset, 'test': Dataset}",
        )
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(
            self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1"
        )
        require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


def validate_data(node: DictConfig | dict | None) -> DataConfig | UserDataConfig:
    """The ``data`` group typed by its ``_target_``: CIFAR-10/synthetic images or the
    user's own datasets."""
    target = (node or {}).get("_target_", DataConfig._target_)
    if target == UserDataConfig._target_:
        config = typed(node, UserDataConfig, "data")
        check_target(
            config.datasets["_target_"],
            "data.datasets._target_",
            "an importable function or class of your package (on PYTHONPATH)",
        )
        if config.loss is not None:
            check_target(
                config.loss,
                "data.loss",
                "the dotted name of a loss function fn(logits, labels) or an nn.Module class",
            )
        return config
    return typed(node, DataConfig, "data")


@dataclass
class PathsConfig:
    """``paths`` group: where runs live."""

    runs: str = "runs"
    run_dir: str = "runs/default"
    checkpoint: str = "runs/default/model.pt"  # the FP checkpoint (trained or given)


@dataclass
class RunConfig:
    """Top-level keys."""

    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    stages: list[str] = field(default_factory=lambda: ["train", "evaluate"])
    force: bool = False  # redo stages whose outputs exist

    def __post_init__(self) -> None:
        require(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        require(len(self.stages) >= 1, "stages", self.stages, "a non-empty list of stage names")


def run_config(cfg: DictConfig) -> RunConfig:
    top = {k: cfg[k] for k in ("name", "seed", "device", "stages", "force") if k in cfg}
    return typed(top, RunConfig, "run")


def _schemas() -> dict[str, Any]:
    """Config group -> validator returning the group's typed value (imported here, where
    the groups are gathered: each library defines its own dataclass)."""
    from hawq.alloc.config import AllocConfig
    from hawq.alloc.curve import CurveConfig
    from hawq.analysis.config import LandscapeConfig
    from hawq.hessian.config import HessianConfig
    from hawq.integer.config import IntegerConfig, LatencyConfig
    from hawq.models.config import validate_model
    from hawq.quant.config import QATConfig, QuantConfig, default_setting

    groups = {
        "train": TrainConfig,
        "hessian": HessianConfig,
        "quant": QuantConfig,
        "qat": QATConfig,
        "alloc": AllocConfig,
        "integer": IntegerConfig,
        "latency": LatencyConfig,
        "curve": CurveConfig,
        "landscape": LandscapeConfig,
    }
    out: dict[str, Any] = {k: (lambda node, s=s, k=k: typed(node, s, k)) for k, s in groups.items()}
    out["model"] = validate_model
    out["data"] = validate_data

    def quant(node: Any) -> Any:
        qc = typed(node, QuantConfig, "quant")
        default_setting(qc.default)  # the default op setting is a valid one
        return qc

    out["quant"] = quant
    return out


def validate_group(cfg: DictConfig, group: str) -> Any:
    """The typed value of config group ``group`` (one-line :class:`HawqError` on a bad
    value; a group absent from ``cfg`` takes its schema's defaults); None for a group
    without a schema."""
    schemas = _schemas()
    if group not in schemas:
        return None
    value = schemas[group](cfg.get(group))
    if group == "train" and "train" in cfg:
        check_target(
            OmegaConf.select(cfg, "train.optimizer._target_"),
            "train.optimizer._target_",
            "a torch.optim class such as torch.optim.AdamW or torch.optim.SGD",
        )
    return value


def validate_groups(cfg: DictConfig, groups: set[str] | list[str]) -> dict[str, Any]:
    """Validate each named config group present in ``cfg`` against its schema, before any
    work (one-line :class:`HawqError` on the first bad value); returns their typed values
    (``Context.group`` hands them to the stages: validated once per run)."""
    return {g: validate_group(cfg, g) for g in sorted(groups) if g in _schemas() and g in cfg}
