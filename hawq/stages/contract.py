"""What a stage reads and writes, declared in the stage's own file as ``CONTRACT``.

A stage module ``hawq/stages/<name>.py`` defines ``run(ctx) -> metrics`` and beside it::

    CONTRACT = Contract(
        keys=("seed", "data", "quant"),          # the config it reads (groups or dotted keys)
        inputs=(checkpoint, plan_file),          # the artifacts it reads (functions of ctx)
    )

From the contracts the pipeline validates exactly the groups the chosen stages read, and the
completion records (:mod:`hawq.stages.record`) fingerprint those keys and inputs, so a stage
is skipped only while neither changed. Artifact names are defined once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from hawq.errors import HawqError
from hawq.quant.config import DEFAULT_PLAN
from hawq.stages.context import Context

#: artifact file names in a run directory (one definition: stages and contracts use these)
MODEL = "model.pt"
HESSIAN = "hessian.json"
BITS = "bits.yaml"
LATENCY = "latency.json"
PTQ_MODEL = "ptq_model.pt"
QAT_MODEL = "qat_model.pt"
INTEGER_MODEL = "integer_model.pt"

Inputs = Callable[[Context], list[Path]]


@dataclass(frozen=True)
class Contract:
    """What a stage reads: config keys (groups or dotted keys) and input artifacts.

    Attributes:
        keys: config keys whose values the stage's result depends on.
        inputs: functions of ``ctx`` returning the files it reads (absent ones count too).
        machine: its result depends on this CPU (the ISA it may use): redone elsewhere.
        keep: it trains weights: on a config change it refuses instead of overwriting
            (``force=true`` redoes it, a new ``name=`` keeps both).
    """

    keys: tuple[str, ...]
    inputs: tuple[Inputs, ...] = ()
    machine: bool = False
    keep: bool = False


def checkpoint(ctx: Context) -> list[Path]:
    """The FP checkpoint (``paths.checkpoint``)."""
    return [ctx.checkpoint]


def run_files(*names: str) -> Inputs:
    """Files of the run directory."""
    return lambda ctx: [ctx.path(n) for n in names]


def configured(key: str, default: str) -> Inputs:
    """The file named by config ``key`` when set, else ``default`` in the run directory."""

    def paths(ctx: Context) -> list[Path]:
        value = OmegaConf.select(ctx.cfg, key, default=None)
        return [Path(value).expanduser() if value else ctx.path(default)]

    return paths


def plan_file(ctx: Context) -> list[Path]:
    """The plan ``ptq``/``qat`` read (``quant.plan``, else ``bits.yaml``, see
    :func:`hawq.quant.config.resolve_plan`)."""
    if OmegaConf.select(ctx.cfg, "quant.plan", default=None) == DEFAULT_PLAN:
        return []  # quant.default only: no plan file is read
    return configured("quant.plan", BITS)(ctx)


def latency_table(ctx: Context) -> list[Path]:
    """The latency table ``alloc`` reads for a ``latency_us`` budget."""
    table = OmegaConf.select(ctx.cfg, "alloc.latency_table", default=None)
    if table:
        return [Path(table).expanduser()]
    if OmegaConf.select(ctx.cfg, "alloc.latency_us", default=None) is None:
        return []
    return [ctx.path(OmegaConf.select(ctx.cfg, "latency.out", default=LATENCY))]


def latency_out(ctx: Context) -> Path:
    """Where this run's latency table is written (``latency.out`` in the run directory)."""
    return ctx.path(ctx.group("latency").out)


#: the quantized checkpoints the integer stage converts, in order of preference
QUANTIZED_SOURCES = (QAT_MODEL, PTQ_MODEL)


def quantized_source(ctx: Context) -> Path:
    """The quantized checkpoint to convert: ``integer.source``, else the run's QAT model,
    else its PTQ model."""
    ic = ctx.group("integer")
    if ic.source is not None:
        path = Path(ic.source).expanduser()
        if not path.is_file():
            raise HawqError(f"integer.source={ic.source} does not exist")
        return path
    for name in QUANTIZED_SOURCES:
        if ctx.path(name).is_file():
            return ctx.path(name)
    raise HawqError(
        f"no quantized checkpoint in {ctx.run_dir} ({' or '.join(QUANTIZED_SOURCES)}); "
        "run the ptq or qat stage first, or set integer.source"
    )
