"""Bad inputs end in one line ``hawq: error: ...`` naming the value and what is allowed,
exit 2, no traceback, and no new or changed artifact (issues 16 and 18)."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from hawq.alloc.report import synthetic_report
from hawq.checkpoint import build_model, save_model
from hawq.data.cifar10 import load_cifar10
from hawq.errors import HawqError
from hawq.lock import LOCK_NAME
from hawq.pipeline import run_pipeline
from hawq.stages.context import check_run_dir

from ..conftest import REPO, run_cli

TINY = ("experiment=smoke", "data.train_subset=64", "data.test_subset=64", "train.epochs=1")


def snapshot(run_dir):
    """Every artifact under ``run_dir`` -> its bytes (Hydra's own log and the run-directory
    lock, which names the last process that held it, are not artifacts)."""
    if not run_dir.exists():
        return {}
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
            and p.name != LOCK_NAME}  # fmt: skip


def one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.strip().splitlines() if "[hawq][INFO]" not in ln]
    assert len(err) == 1 and err[0].startswith("hawq: error: "), proc.stderr
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


@pytest.fixture
def fp_run(make_cfg, tmp_path):
    """A run directory holding an (untrained) tiny ViT model.pt, written in milliseconds."""
    cfg = make_cfg(*TINY)
    run_dir = tmp_path / "run"
    save_model(run_dir / "model.pt", build_model(cfg.model), cfg.model)
    return run_dir


# --- config values (typed groups), checked before Hydra writes anything -----------------


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.foo=1", ["unknown config key train.foo", "+train.foo=1"]),
        ("model.bogus=1", ["unknown config key model.bogus"]),
        ("train.optimizer._target_=torch.optim.Nope",
         ["train.optimizer._target_='torch.optim.Nope'", "torch.optim"]),
        ("model.heads=3", ["model.heads=3", "a divisor of dim=64"]),
        ("model.depth=abc", ["model.depth", "abc"]),
        ("model.dropout=1.5", ["model.dropout=1.5", "0 <= dropout < 1"]),
        ("model.patch_size=5", ["model.patch_size=5", "image_size=32"]),
        ("quant.default.w_bits=9", ["w_bits=9", "1-8"]),
        ("paths.run_dir=", ["paths.run_dir is empty", "allowed"]),
    ],
)  # fmt: skip
def test_cli_precheck_bad_config(tmp_path, monkeypatch, override, needles):
    """What ``python -m hawq.run`` checks before Hydra starts (and writes its log)."""
    from hawq.run import honour_hydra_run_dir, precheck

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "stages=[train,ptq]", f"paths.run_dir={run_dir}", override]
    with pytest.raises(HawqError) as e:
        precheck(honour_hydra_run_dir(args))
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere (cwd included)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.foo=1", ["unknown config key train.foo", "+train.foo=1"]),
        ("paths.run_dir=", ["paths.run_dir is empty", "allowed"]),
    ],
)
def test_cli_bad_config_one_line_exit_2_nothing_written(tmp_path, override, needles):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=smoke", f"paths.run_dir={run_dir}", override, cwd=tmp_path)
    one_line(proc, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere (cwd included)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.heads=5", r"model\.heads=5 is invalid; allowed: a divisor of dim=64"),
        ("model.depth=abc", "bad config model.depth"),
        ("model=resnet_tiny model.depth=9", r"model\.depth=9 is invalid; allowed: 6n\+2"),
        ("train.optimizer._target_=torch.optim.adamw.Nope", "cannot import it"),
        ("model._target_=hawq.models.nothing.Net", r"model\._target_=.*cannot import"),
    ],
)
def test_model_and_optimizer_validated_before_any_work(make_cfg, tmp_path, override, match):
    with pytest.raises(HawqError, match=match):
        run_pipeline(make_cfg(*TINY, *override.split()))
    assert not (tmp_path / "run").exists()


def test_model_schemas_accept_the_shipped_models(make_cfg):
    from hawq.models.config import validate_model

    for model in ("vit_tiny", "vit_cifar", "vit_cifar_cpu", "resnet20", "resnet_tiny"):
        validate_model(make_cfg(f"model={model}").model)


# --- files of earlier stages ---------------------------------------------------------


def test_resume_state_of_another_model(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "stages=[train]")
    run_dir = tmp_path / "run"
    other = build_model(make_cfg("model=resnet_tiny").model)
    opt = torch.optim.Adam(other.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run_dir.mkdir()
    torch.save({"epoch": 1, "history": [], "model": other.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               run_dir / "train_state.pt")  # fmt: skip
    before = snapshot(run_dir)
    with pytest.raises(HawqError, match=r"train_state\.pt does not fit this run's model .*force"):
        run_pipeline(cfg)
    assert snapshot(run_dir) == before
    (run_dir / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HawqError, match=r"corrupt checkpoint .*train_state\.pt"):
        run_pipeline(cfg)


def _hessian(run_dir, cfg, mutate):
    model = build_model(cfg.model)
    report = synthetic_report(model)
    report.update(estimator="hutchinson", backend="double_backward", seed=0, dtype="float64",
                  batches=1, batch_size=1, wall_s=0.0, split="train", world_size=1,
                  backend_timings_s={}, hvp_products=0, whole_trace={"mean": 1.0, "stderr": 0})
    mutate(report["ops"])
    (run_dir / "hessian.json").write_text(json.dumps(report))  # NaN written as the token NaN


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda ops: ops["head"].update(trace=math.nan), r"op 'head' trace=nan"),
        (lambda ops: ops["head"].update(trace="big"), r"op 'head' trace='big'"),
        (lambda ops: ops["head"].update(eigenvalues=[math.inf]), r"eigenvalues\[0\]=inf"),
        (lambda ops: ops["head"]["act_trace"].update(x=math.nan), r"act_trace\.x=nan"),
        (lambda ops: ops["patch_embed"].update(macs="lots"), r"macs='lots'"),
    ],
)
@pytest.mark.parametrize("stage", ["alloc", "int4_curve"])
def test_hessian_json_with_non_finite_or_string_numbers(make_cfg, fp_run, stage, mutate, match):
    cfg = make_cfg(*TINY, f"stages=[{stage}]")
    _hessian(fp_run, cfg, mutate)
    before = snapshot(fp_run)
    with pytest.raises(HawqError, match=match + ".*allowed: a finite number or null"):
        run_pipeline(cfg)
    assert snapshot(fp_run) == before  # no bits.yaml, no int4_curve.json, no plots


def test_hessian_json_valid_numbers_accepted(make_cfg, fp_run):
    cfg = make_cfg(*TINY, "stages=[alloc]")
    _hessian(fp_run, cfg, lambda ops: None)
    run_pipeline(cfg)
    assert (fp_run / "bits.yaml").is_file()


@pytest.mark.parametrize("text", ["plan: [unclosed\n  a: {b\n", "\x00binary", "a: b: c\n"])
def test_bits_yaml_not_yaml(make_cfg, fp_run, text):
    (fp_run / "bits.yaml").write_text(text)
    before = snapshot(fp_run)
    with pytest.raises(HawqError, match=r"cannot read YAML .*bits\.yaml: .*allowed") as e:
        run_pipeline(make_cfg(*TINY, "stages=[ptq]"))
    assert "\n" not in str(e.value)
    assert snapshot(fp_run) == before


@pytest.mark.slow
def test_cli_bits_yaml_not_yaml_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: [unclosed\n  a: {b\n")
    cfg_dir = tmp_path / "run"
    proc = run_cli(*TINY, "stages=[ptq]", f"quant.plan={bad}", f"paths.run_dir={cfg_dir}")
    one_line(proc, f"cannot read YAML {bad}", "line 2")
    assert not (cfg_dir / "ptq_model.pt").exists()


# --- data sets -------------------------------------------------------------------------


def _npz(root, parts, n=4, total=3):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in parts:
        np.savez(root / f"cifar10_train_part{k}of{total}.npz",
                 x=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, n).astype(np.int64))  # fmt: skip
    np.savez(root / "cifar10_test.npz", x=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, n).astype(np.int64))  # fmt: skip
    return root


def test_partial_npz_shards_are_an_error_unless_asked(tmp_path):
    root = _npz(tmp_path / "c", parts=[2])
    with pytest.raises(HawqError, match=r"1 of 3 train shards \(cifar10_train_part1of3\.npz, "
                                        r"cifar10_train_part3of3\.npz missing\).*data\.partial"):
        load_cifar10(root)
    assert len(load_cifar10(root, partial=True).train) == 4
    assert len(load_cifar10(_npz(tmp_path / "full", parts=[1, 2, 3])).train) == 12


def test_partial_python_batches_are_an_error_unless_asked(tmp_path):
    import pickle

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in ("data_batch_1", "data_batch_4", "test_batch"):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(HawqError, match=r"2 of 5 train batches \(data_batch_2, data_batch_3, "
                                        r"data_batch_5 missing\)"):
        load_cifar10(tmp_path)
    assert len(load_cifar10(tmp_path, partial=True).train) == 4


def test_empty_data_set_is_always_an_error(tmp_path):
    root = _npz(tmp_path / "c", parts=[1, 2, 3], n=0)
    for partial in (False, True):
        with pytest.raises(HawqError, match="the train split has 0 images"):
            load_cifar10(root, partial=partial)


def test_partial_data_through_the_pipeline(make_cfg, tmp_path):
    root = _npz(tmp_path / "c", parts=[1, 3])
    cfg = make_cfg(*TINY, "stages=[train]", f"data.root={root}")
    with pytest.raises(HawqError, match="2 of 3 train shards"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "model.pt").exists()
    res = run_pipeline(make_cfg(*TINY, "stages=[train]", f"data.root={root}", "data.partial=true"))
    assert res["stages"]["train"]["epochs"] == 1


# --- the run directory and the disk -------------------------------------------------------


def test_run_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, match in (("", "is empty"), ("  ", "is empty"), (None, "is empty"),
                       (tmp_path / "file" / "run", "is a regular file, not a folder"),
                       (tmp_path / "file", "is a regular file")):  # fmt: skip
        with pytest.raises(HawqError, match=match):
            check_run_dir(bad)
    assert check_run_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli(*TINY, f"paths.run_dir={tmp_path}/file/run", cwd=tmp_path)
    one_line(proc, f"paths.run_dir={tmp_path}/file/run", "regular file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "x"


def _unprivileged():
    """Prefix that runs a command without root's permission override (or [] if not root)."""
    if os.geteuid() != 0:
        return []
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("root without capsh: cannot drop CAP_DAC_OVERRIDE")
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c"]


def test_cli_read_only_run_dir(tmp_path):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    run_dir.chmod(0o555)
    try:
        prefix = _unprivileged()
        cmd = [sys.executable, "-m", "hawq.run", *TINY, f"paths.run_dir={run_dir}"]
        if prefix:
            cmd = [*prefix, " ".join(f"'{c}'" for c in cmd)]
        env = {k: v for k, v in os.environ.items() if k != "HAWQ_DEBUG"}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=env)  # fmt: skip
        one_line(proc, f"paths.run_dir={run_dir}", "cannot write", "writable folder")
        assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]
    finally:
        run_dir.chmod(0o755)


@pytest.mark.slow
def test_cli_full_disk_while_writing_model_pt(tmp_path):
    """model.pt on a 64 KiB tmpfs (a tiny ViT is ~300 KB): ENOSPC -> one line, no partial
    file; the run directory itself is elsewhere. Needs user namespaces (unshare -rm)."""
    unshare = shutil.which("unshare")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if unshare is None:
        pytest.skip("no unshare: cannot mount a tiny tmpfs")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip("cannot mount a tiny tmpfs here (unshare -rm)")
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "hawq.run", *TINY, "stages=[train]", f"paths.run_dir={run_dir}",
           f"paths.checkpoint={mnt}/model.pt"]  # fmt: skip
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && cd {REPO} && "
              + " ".join(f"'{c}'" for c in cli) + f"; rc=$?; ls -A {mnt} > {tmp_path}/ls; exit $rc")
    env = {k: v for k, v in os.environ.items() if k != "HAWQ_DEBUG"}
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    one_line(proc, f"cannot write {mnt}/model.pt", "No space left on device")
    assert (tmp_path / "ls").read_text() == ""  # no model.pt, no temp file left on the tmpfs
    assert not (run_dir / "records" / "train.json").exists()
    assert (run_dir / "train_state.pt").is_file()  # the finished epoch is kept: rerun resumes


# --- Hydra conventions and the documented alloc.pins mapping (command line) ---------------


def test_cli_alloc_pins_mapping_and_hydra_run_dir(make_cfg, tmp_path):
    """``alloc.pins={head:{w_bits:8,a_bits:8}}`` as documented works from the command line,
    and ``hydra.run.dir=DIR`` is honoured: the artifacts (and Hydra's log) go to DIR."""
    run_dir = tmp_path / "hydra_dir"
    cfg = make_cfg(*TINY, run_dir=run_dir)
    save_model(run_dir / "model.pt", build_model(cfg.model), cfg.model)
    _hessian(run_dir, cfg, lambda ops: None)
    proc = run_cli(*TINY, "stages=[alloc]", "alloc.int4_share=0.9",
                   "alloc.pins={head:{w_bits:8,a_bits:8}}", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load((run_dir / "bits.yaml").read_text())
    assert plan["plan"]["head"]["w_bits"] == 8 and plan["plan"]["head"]["a_bits"] == 8
    assert (run_dir / "results.json").is_file() and (run_dir / ".hydra").is_dir()
    assert not (tmp_path / "runs").exists()  # not the default runs/<name> (cwd is tmp_path)


def test_hydra_run_dir_and_paths_run_dir_disagree():
    from hawq.run import honour_hydra_run_dir

    assert honour_hydra_run_dir(["hydra.run.dir=/a"]) == ["hydra.run.dir=/a", "paths.run_dir=/a"]
    assert honour_hydra_run_dir(["hydra.run.dir=/a", "paths.run_dir=/a"]) == [
        "hydra.run.dir=/a", "paths.run_dir=/a"]
    with pytest.raises(HawqError, match="disagree; set only paths.run_dir"):
        honour_hydra_run_dir(["hydra.run.dir=/a", "paths.run_dir=/b"])
