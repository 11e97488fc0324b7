"""End-to-end runs of the train/evaluate pipeline and its error handling."""

import json

import pytest
import torch

from hawq.errors import HawqError
from hawq.pipeline import run_pipeline

from ..conftest import run_cli

SMOKE = ("experiment=smoke", "data.train_subset=256", "data.test_subset=128", "train.epochs=2",
         "stages=[train,evaluate]")  # fmt: skip
ALL_STAGES = ["train", "evaluate", "hessian", "alloc", "ptq", "qat", "integer", "int4_curve",
              "landscape"]  # fmt: skip


def test_smoke_default_runs_the_whole_pipeline(make_cfg, tmp_path):
    cfg = make_cfg("experiment=smoke", "data.train_subset=256", "data.test_subset=128")
    assert list(cfg.stages) == ALL_STAGES
    res = run_pipeline(cfg)
    assert list(res["stages"]) == ALL_STAGES
    run_dir = tmp_path / "run"
    for artifact in ("model.pt", "hessian.json", "bits.yaml", "ptq_model.pt", "qat_model.pt",
                     "integer_model.pt", "int4_curve.json", "landscape.json"):  # fmt: skip
        assert (run_dir / artifact).is_file(), artifact
    assert res["stages"]["ptq"]["plan_source"] == str(run_dir / "bits.yaml")


def test_smoke_end_to_end(make_cfg, tmp_path):
    results = run_pipeline(make_cfg(*SMOKE))
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["stages"]["evaluate"]["fp"]["acc"] == results["stages"]["evaluate"]["fp"]["acc"]
    assert {"stages", "config", "provenance", "name"} <= set(on_disk)
    assert {"versions", "git", "hardware"} <= set(on_disk["provenance"])
    assert on_disk["config"]["model"]["dim"] == 64
    train = on_disk["stages"]["train"]
    assert train["epochs"] == 2 and train["test_acc"] > 10.0  # learns beyond chance
    assert train["test_acc"] == on_disk["stages"]["evaluate"]["fp"]["acc"]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 3
    assert (run_dir / "model.pt").is_file() and not (run_dir / "train_state.pt").exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_rerun_skips_existing_outputs_unless_forced(make_cfg, tmp_path):
    run_pipeline(make_cfg(*SMOKE))
    ckpt = tmp_path / "run" / "model.pt"
    mtime = ckpt.stat().st_mtime_ns
    again = run_pipeline(make_cfg(*SMOKE))
    assert ckpt.stat().st_mtime_ns == mtime, "trained model reloaded, not retrained"
    assert "evaluate" in again["stages"]
    run_pipeline(make_cfg(*SMOKE, "force=true", "stages=[train]"))
    assert ckpt.stat().st_mtime_ns != mtime


def test_evaluate_alone_from_a_given_checkpoint(make_cfg, tmp_path):
    run_pipeline(make_cfg(*SMOKE, "stages=[train]"))
    other = tmp_path / "other"
    given = f"paths.checkpoint={tmp_path}/run/model.pt"
    res = run_pipeline(make_cfg(*SMOKE, "stages=[evaluate]", given, run_dir=other))
    assert res["stages"]["evaluate"]["fp"]["n"] == 128
    assert not (other / "model.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs=0 is invalid; allowed: an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("train.epochs=abc", "bad config train.epochs"),
        ("stages=[train,nope]", "unknown stage 'nope'; available: .*evaluate.*train"),
        ("device=tpu", "device='tpu' is invalid"),
    ],
)
def test_bad_config_values(make_cfg, tmp_path, override, message):
    with pytest.raises(HawqError, match=message):
        run_pipeline(make_cfg(*SMOKE, override))
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_data_one_line(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar10", f"data.root={tmp_path}/none", "data.download=false")
    with pytest.raises(HawqError, match="CIFAR-10 not found"):
        run_pipeline(cfg)


def test_cli_unknown_model(tmp_path):
    proc = run_cli("model=no_such_model", f"paths.run_dir={tmp_path}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == ["hawq: error: unknown model 'no_such_model'; available: custom, resnet20, "
                   "resnet_tiny, torch_vit_cifar, torch_vit_tiny, vit_cifar, vit_cifar_cpu, "
                   "vit_tiny"]  # fmt: skip


def test_cli_bad_value_and_corrupt_checkpoint(tmp_path):
    proc = run_cli("experiment=smoke", "train.epochs=0", f"paths.run_dir={tmp_path}/a")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hawq: error: bad config: train.epochs=0")

    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    proc = run_cli("experiment=smoke", "stages=[evaluate]", f"paths.run_dir={tmp_path}/b",
                   f"paths.checkpoint={tmp_path}/bad.pt")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"hawq: error: corrupt checkpoint {tmp_path}/bad.pt" in proc.stderr
    assert not (tmp_path / "b" / "results.json").exists()


def test_checkpoint_rebuilds_model_without_config(make_cfg, tmp_path):
    from hawq.checkpoint import load_model

    run_pipeline(make_cfg(*SMOKE, "stages=[train]"))
    model, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["epochs"] == 2
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_smoke_on_real_cifar10_when_root_points_at_it(make_cfg, cifar10_dir):
    res = run_pipeline(make_cfg(*SMOKE, f"data.root={cifar10_dir}", "train.epochs=1"))
    assert res["config"]["data"]["root"] == str(cifar10_dir)
    assert res["stages"]["evaluate"]["fp"]["n"] == 128
