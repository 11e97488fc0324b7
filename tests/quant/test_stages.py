"""Stages ptq and qat through the pipeline (smoke sizes, CPU)."""

import csv
import json

import pytest
import torch
from torch import nn

import hawq.stages.qat as qat_stage
from hawq.errors import HawqError
from hawq.pipeline import run_pipeline
from hawq.quant import OpSetting, Plan, calibrate, load_quantized, quantize_, save_plan
from hawq.quant.config import QATConfig
from hawq.run import CONF_DIR

from ..conftest import run_cli
from .cases import batches, tiny_vit

SMOKE = ("experiment=smoke", "data.train_subset=256", "data.test_subset=128", "device=cpu",
         "train.epochs=2", "qat.epochs=2", "quant.calib_batches=2")  # fmt: skip
W4A4 = ("quant.default.w_bits=4", "quant.default.a_bits=4")


@pytest.fixture(scope="module")
def fp_vit(tmp_path_factory):
    """One trained tiny-ViT checkpoint shared by the stage tests (train runs once)."""
    from hydra import compose, initialize_config_dir


    run = tmp_path_factory.mktemp("fp")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.run_dir={run}", *SMOKE, "stages=[train]"])
    run_pipeline(cfg)
    return f"paths.checkpoint={run / 'model.pt'}"


# The premise is a model that learned something, so that QAT has a loss to lower on any CPU:
# the tiny ResNet at the smoke lr (1e-3, 8 steps) stays at chance (loss ~ ln 10) and QAT
# then moves the loss by float noise only; at lr 1e-2 for 3 epochs it leaves chance.
FIT = {"vit_tiny": (), "resnet_tiny": ("train.optimizer.lr=1e-2", "train.epochs=3")}


@pytest.mark.parametrize(("model", "calibrator"), [("vit_tiny", "percentile"),
                                                   ("resnet_tiny", "mse")])
def test_ptq_then_qat_improves_quantized_loss(make_cfg, tmp_path, model, calibrator):
    res = run_pipeline(make_cfg(*SMOKE, *W4A4, f"model={model}", "stages=[train,ptq,qat]",
                                f"quant.default.calibrator={calibrator}", *FIT[model]))
    ptq, qat = res["stages"]["ptq"], res["stages"]["qat"]
    assert ptq["fp"]["acc"] == res["stages"]["train"]["test_acc"]
    assert qat["init"]["loss"] == pytest.approx(ptq["quantized"]["loss"], rel=0.05)
    assert qat["quantized"]["loss"] < qat["init"]["loss"], "QAT must lower the quantized loss"
    run = tmp_path / "run"
    for name in ("ptq_model.pt", "qat_model.pt", "ptq_bits.yaml", "qat_bits.yaml",
                 "qat_metrics.csv"):
        assert (run / name).is_file(), name
    assert not (run / "qat_state.pt").exists()
    # the quantized checkpoint rebuilds the model that was evaluated
    qmodel, plan, meta = load_quantized(run / "qat_model.pt")
    assert plan.default.w_bits == 4 and meta["acc"] == qat["quantized"]["acc"]
    ops = ptq["ops"]
    assert len(ops) == (14 if model == "vit_tiny" else 8) and all("W4" in v or "A4" in v
                                                                 for v in ops.values())  # fmt: skip
    if model == "resnet_tiny":
        assert ops["conv1"].endswith("bn folded")


@pytest.mark.slow  # ~60 s on a busy 2-core CPU: three QAT runs
def test_qat_resumes_exactly(make_cfg, tmp_path, monkeypatch, fp_vit):
    args = (*SMOKE, *W4A4, "stages=[qat]", fp_vit, "qat.epochs=3", "qat.schedule=[8,4]",
            "qat.freeze_bn_epoch=1")  # fmt: skip
    full = run_pipeline(make_cfg(*args, run_dir=tmp_path / "full"))
    killed = tmp_path / "killed"
    real_save, calls = qat_stage.save_torch, []

    def save_then_die(path, obj):  # the process dies right after epoch 2's checkpoint
        real_save(path, obj)
        calls.append(obj["epoch"])
        if obj["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(qat_stage, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(make_cfg(*args, run_dir=killed))
    monkeypatch.setattr(qat_stage, "save_torch", real_save)
    assert (killed / "qat_state.pt").is_file() and not (killed / "qat_model.pt").exists()
    resumed = run_pipeline(make_cfg(*args, run_dir=killed))

    def rows(d):
        with open(d / "qat_metrics.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")}
                    for r in csv.DictReader(f)]  # fmt: skip

    assert rows(killed) == rows(tmp_path / "full") and [r["floor_bits"] for r in rows(killed)] == [
        "8", "4", "4"]  # fmt: skip
    assert resumed["stages"]["qat"]["quantized"] == full["stages"]["qat"]["quantized"]
    a = torch.load(tmp_path / "full" / "qat_model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "qat_model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_plan_precedence_and_bad_op(make_cfg, tmp_path, fp_vit):
    SMOKE_FP = (*SMOKE, fp_vit)
    run = tmp_path / "run"
    run.mkdir()
    save_plan(run / "bits.yaml", Plan.from_dict({"_default": {"w_bits": 6, "a_bits": 6},
                                                 "head": {"w_bits": 3}}))  # fmt: skip
    res = run_pipeline(make_cfg(*SMOKE_FP, "stages=[ptq]"))["stages"]["ptq"]
    assert res["plan_source"].endswith("bits.yaml") and res["ops"]["head"].startswith("W3")
    other = tmp_path / "given.yaml"
    save_plan(other, Plan.from_dict({"_default": {"w_bits": 5, "a_bits": 5},
                                     "no.such.op": {"w_bits": 2}}))  # fmt: skip
    with pytest.raises(HawqError, match="not in the model: no.such.op"):
        run_pipeline(make_cfg(*SMOKE_FP, "stages=[ptq]", "force=true", f"quant.plan={other}"))
    with pytest.raises(HawqError, match="quant.default: w_bits=0 is invalid"):
        run_pipeline(make_cfg(*SMOKE_FP, "stages=[ptq]", "force=true", "quant.plan=null",
                              "quant.default.w_bits=0", run_dir=tmp_path / "r2"))  # fmt: skip
    with pytest.raises(HawqError, match="qat.method='sgd' is invalid"):
        run_pipeline(make_cfg(*SMOKE_FP, "stages=[qat]", "qat.method=sgd"))
    with pytest.raises(HawqError, match="qat.schedule=\\[8, 4\\] ends at 4 bits"):
        run_pipeline(make_cfg(*SMOKE_FP, "stages=[qat]", "qat.schedule=[8,4]", "qat.epochs=3",
                              "quant.plan=null", "quant.default.w_bits=2",
                              run_dir=tmp_path / "r2"))  # fmt: skip


def test_cli_bad_setting_is_one_line(tmp_path):
    proc = run_cli("experiment=smoke", "stages=[ptq]", "quant.default.calibrator=magic",
                   f"paths.run_dir={tmp_path}", "paths.checkpoint=/nonexistent.pt")  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "calibrator='magic' is invalid" in err[0], proc.stderr


def test_nan_loss_names_the_collapsed_op():
    model = tiny_vit()
    quantize_(model, Plan(OpSetting(w_bits=4, a_bits=4)), method="lsq")
    calibrate(model, batches(1))
    with torch.no_grad():
        model.blocks[1].mlp.fc1.a_quant.scale.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(HawqError, match="non-finite scales: blocks.1.mlp.fc1;") as e:
        qat_stage.qat_epoch(model, batches(2), opt, nn.CrossEntropyLoss(), torch.device("cpu"),
                            None, QATConfig(epochs=1, amp=False), 0)  # fmt: skip
    assert "\n" not in str(e.value)


def test_results_json_records_the_stage(tmp_path, make_cfg, fp_vit):
    run_pipeline(make_cfg(*SMOKE, fp_vit, "stages=[ptq]"))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"ptq"} <= set(on_disk["stages"])
    assert on_disk["config"]["quant"]["default"]["w_bits"] == 8


def test_ptq_with_reconstruction_records_units_and_saves_the_reconstructed_model(
        make_cfg, tmp_path, fp_vit):  # fmt: skip
    res = run_pipeline(make_cfg(*SMOKE, *W4A4, fp_vit, "stages=[ptq]",
                                "quant.reconstruct.enabled=true", "quant.reconstruct.iters=20"))
    ptq = res["stages"]["ptq"]
    rec = ptq["reconstruct"]
    assert set(rec["units"]) == {"patch_embed", "blocks.0", "blocks.1", "head"}
    assert rec["images"] == 256 and rec["calibrated"]["n"] == ptq["quantized"]["n"]  # subset
    assert all(u["after"] <= u["before"] for u in rec["units"].values())
    qmodel, _, meta = load_quantized(tmp_path / "run" / "ptq_model.pt")
    assert meta["acc"] == ptq["quantized"]["acc"]
    assert (tmp_path / "run" / "ptq_reconstruct.png").stat().st_size > 1000
    kept = {op for u in rec["units"].values() if u["kept"] for op in u["ops"]}
    assert kept  # (a unit that got worse is restored to plain PTQ: its weights stay FP)
    for name, op in qmodel.named_modules():  # reconstructed weights sit on their grid
        if name in kept and getattr(op, "w_quant", None) is not None:
            s = op.w_quant.scale
            assert torch.equal(torch.round(op.weight / s), torch.round(op.w_quant(op.weight) / s))


def test_ptq_reconstruction_stopped_after_a_unit_resumes_to_the_same_checkpoint(
    make_cfg, tmp_path, fp_vit, monkeypatch, caplog
):
    """Killed after the second unit's state is saved, the same command resumes there (the
    state file keyed by the config) and writes the checkpoint an uninterrupted run writes;
    the state file is gone once the stage's record is."""
    import hawq.stages.ptq as ptq_stage

    args = (*SMOKE, *W4A4, fp_vit, "stages=[ptq]", "quant.reconstruct.enabled=true",
            "quant.reconstruct.iters=20")  # fmt: skip
    clean = run_pipeline(make_cfg(*args, run_dir=tmp_path / "clean"))["stages"]["ptq"]
    saves, real_save = [], ptq_stage.save_torch

    def save_then_die(path, obj):
        real_save(path, obj)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # a kill right after the second unit

    monkeypatch.setattr(ptq_stage, "save_torch", save_then_die)
    run_dir = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(make_cfg(*args, run_dir=run_dir))
    state = run_dir / ptq_stage.RECON_STATE
    assert state.is_file() and not (run_dir / "ptq_model.pt").exists()
    monkeypatch.setattr(ptq_stage, "save_torch", real_save)
    other = run_pipeline(make_cfg(*args, "quant.reconstruct.seed=1", run_dir=tmp_path / "o"))
    assert other["stages"]["ptq"]["reconstruct"]["units"]  # (another dir: state untouched)
    with caplog.at_level("INFO", logger="hawq"):
        resumed = run_pipeline(make_cfg(*args, run_dir=run_dir))["stages"]["ptq"]
    assert "reconstruct: resuming after 2 of 4 units" in caplog.text
    assert not state.exists()
    strip = lambda r: {u: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
                       for u, row in r["reconstruct"]["units"].items()}  # fmt: skip
    assert strip(resumed) == strip(clean) and resumed["quantized"] == clean["quantized"]
    a, _, _ = load_quantized(tmp_path / "clean" / "ptq_model.pt")
    b, _, _ = load_quantized(run_dir / "ptq_model.pt")
    for k, v in a.state_dict().items():
        w = b.state_dict()[k]
        assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v, k


def test_qat_starts_from_a_reconstructed_ptq_checkpoint(make_cfg, tmp_path, fp_vit):
    ptq_dir = tmp_path / "ptq"
    res = run_pipeline(make_cfg(*SMOKE, *W4A4, fp_vit, "stages=[ptq]",
                                "quant.reconstruct.enabled=true", "quant.reconstruct.iters=20",
                                run_dir=ptq_dir))  # fmt: skip
    ptq = res["stages"]["ptq"]["quantized"]
    ckpt = ptq_dir / "ptq_model.pt"
    qat = run_pipeline(make_cfg(*SMOKE, *W4A4, fp_vit, "stages=[qat]", "qat.epochs=1",
                                f"qat.init={ckpt}"))["stages"]["qat"]  # fmt: skip
    assert qat["init"]["acc"] == pytest.approx(ptq["acc"], abs=1.0)
    assert qat["init"]["loss"] == pytest.approx(ptq["loss"], rel=1e-3)
    with pytest.raises(HawqError, match="another plan"):
        run_pipeline(make_cfg(*SMOKE, fp_vit, "stages=[qat]", "qat.epochs=1",
                              f"qat.init={ckpt}", run_dir=tmp_path / "other"))  # fmt: skip
    with pytest.raises(HawqError, match="qat.init"):
        run_pipeline(make_cfg(*SMOKE, *W4A4, fp_vit, "stages=[qat]", "qat.schedule=[8,4]",
                              f"qat.init={ckpt}", run_dir=tmp_path / "prog"))  # fmt: skip


def test_progressive_qat_reconstructs_after_each_drop(make_cfg, tmp_path, fp_vit):
    common = (*SMOKE, fp_vit, "stages=[qat]", "qat.schedule=[8,3]", "qat.epochs=2",
              "quant.default.w_bits=3", "quant.default.a_bits=3")  # fmt: skip
    plain = run_pipeline(make_cfg(*common, run_dir=tmp_path / "plain"))["stages"]["qat"]
    rec = run_pipeline(make_cfg(*common, "qat.reconstruct_on_drop=true",
                                "quant.reconstruct.iters=40", run_dir=tmp_path / "rec"))
    drop_plain, drop_rec = plain["drops"][-1], rec["stages"]["qat"]["drops"][-1]
    assert drop_rec["floor_bits"] == drop_plain["floor_bits"] == 3
    assert drop_rec["loss"] < drop_plain["loss"]  # reconstruction after the re-fit helps


def test_explicit_default_bits_win_over_the_run_directorys_bits_yaml(tmp_path, fp_vit):
    """The README's ``stages=[ptq] quant.default.w_bits=4 quant.default.a_bits=4`` in a run
    directory holding an alloc plan (``bits.yaml``, here all W8A8) quantizes at W4A4 and
    says the plan was not used; without the explicit bits the plan is used."""
    run = tmp_path / "run"
    run.mkdir()
    save_plan(run / "bits.yaml", Plan.from_dict({"_default": {"w_bits": 8, "a_bits": 8}}))
    base = (*SMOKE, fp_vit, "stages=[ptq]", f"paths.run_dir={run}")
    proc = run_cli(*base, *W4A4)
    assert proc.returncode == 0, proc.stderr
    ptq = json.loads((run / "results.json").read_text())["stages"]["ptq"]
    assert ptq["plan_source"] == "quant.default" and set(ptq["bits"]) == {"W4A4", "A4xA4"}
    assert "bits.yaml is not used" in proc.stdout + proc.stderr
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr
    ptq = json.loads((run / "results.json").read_text())["stages"]["ptq"]
    assert ptq["plan_source"].endswith("bits.yaml") and set(ptq["bits"]) == {"W8A8", "A8xA8"}


@pytest.mark.slow  # ~35 s: three CLI runs (train's mid-epoch resume is in the default run)
def test_qat_preempted_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGTERM after the 6th of QAT's 8 steps (the process signals itself: an exact instant;
    train's 8 steps come first): exit 143 with a mid-epoch qat state; the same command ends
    with the uninterrupted run's QAT weights and metrics, bit for bit."""
    import os
    import signal
    import subprocess
    import sys

    from ..conftest import REPO

    args = (*SMOKE, *W4A4, "stages=[train,qat]")

    def cli(run, **env):
        return subprocess.run([sys.executable, "-m", "hawq.run", *args, f"paths.run_dir={run}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip

    assert cli(tmp_path / "full").returncode == 0
    run = tmp_path / "stopped"
    proc = cli(run, HAWQ_SIGNAL_AT_STEP="14")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "hawq: stopped by SIGTERM; qat state at step 2 of epoch 2")
    assert torch.load(run / "qat_state.pt", weights_only=False)["partial"]["progress"]["step"] == 2
    assert cli(run).returncode == 0
    a = torch.load(tmp_path / "full" / "qat_model.pt", weights_only=False)["state_dict"]
    b = torch.load(run / "qat_model.pt", weights_only=False)["state_dict"]
    same = lambda u, v: torch.equal(u, v) if torch.is_tensor(u) else u == v  # noqa: E731
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    rows = [list(csv.DictReader(open(d / "qat_metrics.csv"))) for d in (tmp_path / "full", run)]
    drop = ("seconds", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]
