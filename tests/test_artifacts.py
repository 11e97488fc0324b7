"""Published artifacts: publish a run's checkpoint, re-evaluate it against the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hawq import report
from hawq.pipeline import run_pipeline

from .conftest import CIFAR10_DIR

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "experiments" / "torch_vit_cifar"
CPU_STUDY = REPO / "experiments" / "vit_cifar_cpu"


def test_publish_then_verify_reproduces_fp_and_ptq_rows(make_cfg, tmp_path, capsys):
    cfg = make_cfg("experiment=smoke", "train.epochs=1", "data.train_subset=256",
                   "data.test_subset=128", "quant.calib_batches=1",
                   "stages=[train,evaluate,ptq]", "device=cpu")  # fmt: skip
    res = run_pipeline(cfg)
    run_dir, art = tmp_path / "run", tmp_path / "artifacts"
    assert report.main(["publish", str(run_dir), str(art / "fp")]) == 0
    assert report.main(["publish", str(run_dir), str(art / "ptq"), "--checkpoint",
                        "ptq_model.pt"]) == 0  # fmt: skip
    rows = [{"label": "FP", "runs": "run", "metric": "stages.evaluate.fp.acc",
             "artifact": str(art / "fp")},
            {"label": "PTQ", "runs": "run", "metric": "stages.ptq.quantized.acc",
             "artifact": str(art / "ptq")}]  # fmt: skip
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(rows))
    assert report.main(["verify", str(path), "--tol", "0"]) == 0  # deterministic here
    out = capsys.readouterr().out
    assert "2 published checkpoint(s), 0 off" in out
    assert f"published {res['stages']['evaluate']['fp']['acc']:.2f}" in out
    # a checkpoint that no longer gives its number is caught
    doc = json.loads((art / "fp" / "results.json").read_text())
    doc["stages"]["evaluate"]["fp"]["acc"] += 1.0
    (art / "fp" / "results.json").write_text(json.dumps(doc))
    assert report.main(["verify", str(path), "--tol", "0.5"]) == 1


@pytest.mark.parametrize("study", [STUDY, CPU_STUDY], ids=["second_study", "cpu_vit"])
def test_published_fp_row_reproduces(study):
    """The FP checkpoint behind each study's table, re-evaluated on the CIFAR-10 test set."""
    if not CIFAR10_DIR.is_dir() or not (study / "artifacts").is_dir():
        pytest.skip("needs CIFAR-10 (CIFAR10_DIR) and the artifacts")
    rows = [r for r in report.load_rows(study / "rows.yaml") if r.artifact]
    fp = [r for r in rows if r.metric == "stages.evaluate.fp.acc"]
    assert fp, "the FP row must name its artifact"
    from hawq.artifacts import verify

    (check,) = verify(fp, str(CIFAR10_DIR))
    assert abs(check.diff) <= 0.05
