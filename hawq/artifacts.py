"""Published artifacts: the checkpoints behind a results table, and re-checking them.

A study publishes, per headline run, a small folder inside the repository
(``experiments/<study>/artifacts/<run>/``) holding the run's ``results.json`` and the
checkpoint its row measured (``model.pt`` for FP rows, ``ptq_model.pt`` / ``qat_model.pt``
for quantized rows). A row of ``rows.yaml`` names it with ``artifact:``::

    - label: FP
      runs: torch_vit_cifar
      metric: stages.evaluate.fp.acc
      artifact: experiments/torch_vit_cifar/artifacts/torch_vit_cifar

``python -m hawq.report publish <run dir> <artifacts dir> --checkpoint ptq_model.pt`` copies
them; ``python -m hawq.report verify experiments/<study>/rows.yaml`` rebuilds every
published checkpoint, evaluates it on the CIFAR-10 test split with the data settings the
run recorded and compares the accuracy with the table's number (exact up to ``tol``
points: evaluation is deterministic on one machine, other CPUs may differ in the last
float bits).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hawq.errors import HawqError
from hawq.io import read_json

#: checkpoint file per metric prefix (which stage's model the row measured)
CHECKPOINTS = {
    "stages.evaluate.": "model.pt",
    "stages.ptq.": "ptq_model.pt",
    "stages.qat.": "qat_model.pt",
}


def checkpoint_for(metric: str) -> str:
    for prefix, name in CHECKPOINTS.items():
        if metric.startswith(prefix):
            return name
    raise HawqError(
        f"verify: metric {metric} names no checkpoint; allowed prefixes: {', '.join(CHECKPOINTS)}"
    )


#: small files published beside results.json when the run has them (a row's plan, its plot)
ALSO = ("bits.yaml", "bits_per_op.png")


def publish(run_dir: str | Path, dest: str | Path, checkpoint: str | None) -> Path:
    """Copy ``results.json``, ``checkpoint`` (None: results only, e.g. the draws of a
    random-sensitivity band) and the run's plan (:data:`ALSO`) of ``run_dir`` into
    ``dest``."""
    run_dir, dest = Path(run_dir), Path(dest)
    needed = ["results.json", *([checkpoint] if checkpoint else [])]
    for name in needed:
        if not (run_dir / name).is_file():
            raise HawqError(f"publish: {run_dir / name} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    for name in [*needed, *(n for n in ALSO if (run_dir / n).is_file())]:
        shutil.copyfile(run_dir / name, dest / name)
    return dest


@dataclass
class Check:
    """One re-evaluated artifact: the table's number and the one measured now."""

    label: str
    artifact: str
    published: float
    measured: float

    @property
    def diff(self) -> float:
        return self.measured - self.published


def _dig(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


@torch.no_grad()
def reevaluate(folder: str | Path, metric: str, data_root: str | None = None) -> float:
    """Test accuracy (%) of the checkpoint in ``folder`` for ``metric``, with the data
    settings of the run's recorded config."""
    from hydra.utils import instantiate

    from hawq.checkpoint import load_model
    from hawq.engine import evaluate
    from hawq.quant import load_quantized

    folder = Path(folder)
    results = read_json(folder / "results.json")
    data_cfg = dict(results["config"]["data"])
    if "download" in data_cfg:
        data_cfg["download"] = False
    if data_root is not None and data_cfg.get("root") is not None:
        data_cfg["root"] = data_root  # a run on a CIFAR-10 folder: this machine's copy
    data = instantiate(data_cfg)  # synthetic and custom data are rebuilt as recorded
    ckpt = folder / checkpoint_for(metric)
    if ckpt.name == "model.pt":
        model, _ = load_model(ckpt)
    else:
        model, _, _ = load_quantized(ckpt)
    cpu = torch.device("cpu")
    return float(evaluate(model.eval(), data.eval_loader("test", cpu), cpu)["acc"])


def verify(rows, data_root: str | None = None, log=print) -> list[Check]:
    """Re-evaluate every row with an ``artifact`` (see the module docstring)."""
    checks = []
    for row in rows:
        if not row.artifact:
            continue
        results = read_json(Path(row.artifact) / "results.json")
        published = _dig(results, row.metric)
        if published is None:
            raise HawqError(f"verify: {row.artifact}/results.json has no {row.metric}")
        measured = reevaluate(row.artifact, row.metric, data_root)
        checks.append(Check(row.label, row.artifact, float(published), measured))
        log(f"verify: {row.label}: published {published:.2f}, measured {measured:.2f}")
    return checks
