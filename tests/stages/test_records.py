"""Completion records: a stage is skipped only when its record matches the config keys it
reads, its input artifacts and its outputs; otherwise it is redone, or (train, qat) refused.

One smoke-size run of every stage (module fixture; ptq runs *before* alloc, as when the
README's PTQ example comes first) and then, per stage, a key it reads is changed.
"""

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir

from hawq.config import run_config
from hawq.errors import HawqError
from hawq.pipeline import run_pipeline
from hawq.stages import record
from hawq.stages.context import Context

from ..conftest import REPO

BASE = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64", "train.epochs=1",
        "qat.epochs=1", "hessian.max_samples=6", "hessian.min_samples=3", "hessian.density=false",
        "curve.step=7", "landscape.points_1d=3", "landscape.points_2d=3",
        "landscape.quant_path_points=3")  # fmt: skip
ORDER = "stages=[train,evaluate,ptq,hessian,alloc,qat,integer,int4_curve,landscape]"


def compose_cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.run_dir={run_dir}", *BASE, *overrides])


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("records") / "run"
    res = run_pipeline(compose_cfg(run_dir, ORDER))
    return run_dir, res


@pytest.fixture
def run_copy(done_run, tmp_path):
    """A private copy of the finished run (records are relative to the run directory)."""
    src, res = done_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, res


def status(run_dir, stage, *overrides):
    cfg = compose_cfg(run_dir, *overrides)
    return record.check(Context(cfg, run_config(cfg)), stage)


@pytest.mark.slow
def test_every_stage_recorded_and_up_to_date(run_copy):
    run_dir, res = run_copy
    for stage in ("train", "evaluate", "ptq", "hessian", "alloc", "qat", "integer", "int4_curve",
                  "landscape"):  # fmt: skip
        rec = json.loads((run_dir / "records" / f"{stage}.json").read_text())
        assert rec["metrics"] == res["stages"][stage], stage
        assert rec["outputs"] or stage == "evaluate", stage  # evaluate writes results only
        # ptq ran before alloc wrote bits.yaml (see test_ptq_after_alloc_uses_the_new_bits_yaml)
        assert status(run_dir, stage).done == (stage != "ptq"), stage
    first = run_pipeline(compose_cfg(run_dir, ORDER))  # redoes ptq and what reads ptq_model.pt
    assert {s for s in res["stages"] if first["stages"][s] != res["stages"][s]} == {
        "ptq", "integer", "landscape"}
    # now a rerun of everything is a no-op: artifacts unchanged, same results
    before = {p: p.read_bytes() for p in run_dir.glob("*.pt")}
    again = run_pipeline(compose_cfg(run_dir, ORDER))
    assert {p: p.read_bytes() for p in run_dir.glob("*.pt")} == before
    assert again["stages"] == first["stages"]


@pytest.mark.parametrize(
    ("stage", "override", "key"),
    [
        ("evaluate", "data.test_subset=32", "data.test_subset"),
        ("hessian", "hessian.max_samples=7", "hessian.max_samples"),
        ("hessian", "data.test_subset=32", "data.test_subset"),
        ("alloc", "alloc.int4_share=0.25", "alloc.int4_share"),
        ("alloc", "quant.default.calibrator=mse", "quant.default.calibrator"),
        ("ptq", "quant.default.w_bits=4", "quant.default.w_bits"),
        ("ptq", "quant.calib_batches=1", "quant.calib_batches"),
        ("qat", "qat.lr=0.001", "qat.lr"),
        ("integer", "integer.residual_bits=12", "integer.residual_bits"),
        ("int4_curve", "curve.step=3", "curve.step"),
        ("landscape", "landscape.points_1d=5", "landscape.points_1d"),
        ("train", "train.epochs=2", "train.epochs"),
        ("train", "model.dropout=0.2", "model.dropout"),
        ("train", "seed=1", "seed"),
    ],
)
def test_a_changed_key_is_noticed(run_copy, stage, override, key):
    run_dir, _ = run_copy
    st = status(run_dir, stage, override)
    assert not st.done
    assert any(c.startswith(f"{key}=") for c in st.changed), st.changed
    if stage != "ptq":  # (ptq is stale anyway: it ran before alloc)
        assert status(run_dir, stage).done  # only that key: the unchanged config is still done


def test_keys_a_stage_does_not_read_leave_it_done(run_copy):
    run_dir, _ = run_copy
    assert status(run_dir, "hessian", "qat.lr=0.001").done
    assert status(run_dir, "train", "alloc.int4_share=0.25", "device=cpu").done


def test_cheap_stage_is_redone_with_the_new_value(run_copy):
    run_dir, res = run_copy
    again = run_pipeline(compose_cfg(run_dir, "stages=[evaluate]", "data.test_subset=32"))
    assert again["stages"]["evaluate"]["fp"]["n"] == 32 != res["stages"]["evaluate"]["fp"]["n"]
    disk = json.loads((run_dir / "results.json").read_text())
    assert disk["stages"]["evaluate"]["fp"]["n"] == 32
    assert disk["config"]["data"]["test_subset"] == 32


def test_invalid_value_is_an_error_not_a_skip(run_copy):
    run_dir, _ = run_copy
    ptq = (run_dir / "ptq_model.pt").read_bytes()
    with pytest.raises(HawqError, match="w_bits=9"):
        run_pipeline(compose_cfg(run_dir, "stages=[ptq]", "quant.default.w_bits=9"))
    assert (run_dir / "ptq_model.pt").read_bytes() == ptq


def test_ptq_after_alloc_uses_the_new_bits_yaml(run_copy):
    """The fixture ran ptq before alloc (plan quant.default); bits.yaml appearing since is
    a changed input: ptq is redone with it."""
    run_dir, res = run_copy
    assert res["stages"]["ptq"]["plan_source"] == "quant.default"
    st = status(run_dir, "ptq")
    assert not st.done and "input bits.yaml changed" in st.changed
    again = run_pipeline(compose_cfg(run_dir, "stages=[ptq]"))
    assert again["stages"]["ptq"]["plan_source"] == str(run_dir / "bits.yaml")


def test_trained_weights_are_not_overwritten_on_a_config_change(run_copy):
    run_dir, _ = run_copy
    model = (run_dir / "model.pt").read_bytes()
    for stage, override in (("train", "train.epochs=2"), ("qat", "qat.epochs=2")):
        with pytest.raises(HawqError, match=rf"{stage}: .*{override.split('=')[0]}=1 -> 2.*force"
                                            r"=true.*name="):  # fmt: skip
            run_pipeline(compose_cfg(run_dir, f"stages=[{stage}]", override))
    assert (run_dir / "model.pt").read_bytes() == model
    # force=true retrains (and then the downstream input changed: evaluate is redone)
    res = run_pipeline(compose_cfg(run_dir, "stages=[train]", "train.epochs=2", "force=true"))
    assert res["stages"]["train"]["epochs"] == 2
    st = status(run_dir, "evaluate", "train.epochs=2")
    assert not st.done and st.changed == ["input model.pt changed"]


def test_changed_or_missing_output_redoes_the_stage(run_copy):
    run_dir, _ = run_copy
    (run_dir / "hessian_trace.png").unlink()
    assert not status(run_dir, "hessian").done
    (run_dir / "records" / "landscape.json").unlink()
    assert not status(run_dir, "landscape").done
    with open(run_dir / "integer_model.pt", "ab") as f:
        f.write(b"x")
    assert not status(run_dir, "integer").done


def test_missing_results_entry_is_restored_from_the_record(run_copy):
    """A kill between the record and results.json: the rerun skips the stage but its
    results.json entry is back."""
    run_dir, res = run_copy
    disk = json.loads((run_dir / "results.json").read_text())
    del disk["stages"]["hessian"]
    (run_dir / "results.json").write_text(json.dumps(disk))
    again = run_pipeline(compose_cfg(run_dir, "stages=[hessian]"))
    assert again["stages"]["hessian"] == res["stages"]["hessian"]


def test_weights_without_a_record_are_adopted_not_retrained(run_copy):
    """A model.pt from an older hawq (no record, no train_state.pt) is kept."""
    run_dir, _ = run_copy
    (run_dir / "records" / "train.json").unlink()
    model = (run_dir / "model.pt").read_bytes()
    res = run_pipeline(compose_cfg(run_dir, "stages=[train]", "train.epochs=3"))
    assert (run_dir / "model.pt").read_bytes() == model
    assert res["stages"]["train"]["epochs"] == 1  # the entry of the run that made it


def _drop_from_record(run_dir, stage, group, key):
    """Make the record look written by a hawq without ``<group>.<key>`` (an older version)."""
    path = run_dir / "records" / f"{stage}.json"
    rec = json.loads(path.read_text())
    rec["config"][group].pop(key)
    rec["fingerprint"] = record.fingerprint(rec["config"], rec["inputs"])
    path.write_text(json.dumps(rec))


def test_config_keys_added_since_a_record_leave_it_done_at_their_defaults(run_copy):
    """Upgrading hawq (new keys such as quant.reconstruct / qat.init) must not redo a finished
    ptq or make a finished qat refuse; setting the new key to a non-default value does."""
    run_dir, _ = run_copy
    _drop_from_record(run_dir, "ptq", "quant", "reconstruct")
    _drop_from_record(run_dir, "qat", "qat", "init")
    st = status(run_dir, "qat")
    assert st.done and "newer config key" in st.reason, st
    # (this run's ptq ran before alloc wrote bits.yaml: redone for that input alone)
    assert status(run_dir, "ptq").changed == ["input bits.yaml changed"]
    st = status(run_dir, "ptq", "quant.reconstruct.enabled=true")
    assert "quant.reconstruct.enabled='<absent>' -> True" in st.changed
    assert not any("reconstruct.iters" in c for c in st.changed)
    st = status(run_dir, "qat", "qat.init=elsewhere.pt")
    assert not st.done and st.changed == ["qat.init='<absent>' -> 'elsewhere.pt'"]
    model = (run_dir / "qat_model.pt").read_bytes()
    run_pipeline(compose_cfg(run_dir, "stages=[qat]"))  # stays done: nothing rewritten
    assert (run_dir / "qat_model.pt").read_bytes() == model


def test_latency_table_is_remeasured_on_another_cpu(tmp_path, monkeypatch):
    """A latency table times this CPU's kernels: the same run directory on a machine with
    another ISA (or under another ONEDNN_MAX_CPU_ISA cap) redoes the latency stage."""
    from hawq.integer import isa

    run_dir = tmp_path / "run"
    args = ("stages=[train,latency]", "latency.batch=2", "latency.iters=1", "latency.warmup=0")
    res = run_pipeline(compose_cfg(run_dir, *args))
    assert res["stages"]["latency"]
    table = json.loads((run_dir / "latency.json").read_text())
    assert table["kernels"]["isa"] == isa.describe()
    assert table["kernels"]["resolved"] == table["backend"]
    assert status(run_dir, "latency", *args).done
    monkeypatch.setattr(isa, "describe", lambda: {**table["kernels"]["isa"], "family_used": "AVX2"})
    st = status(run_dir, "latency", *args)
    assert not st.done and any(c.startswith("machine") for c in st.changed), st.changed
