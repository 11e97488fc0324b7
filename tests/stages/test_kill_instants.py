"""Crash consistency at every instant between a stage's first artifact and its completion
record, and after it: a stage's metrics always survive (the resumable state file is removed
only after the record), and temp files of killed writes never outlive the next run."""

import pytest

import hawq.pipeline as pipeline
from hawq.lock import RunDirLock
from hawq.stages.context import Context

SMOKE = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64", "device=cpu",
         "train.epochs=2", "qat.epochs=1", "quant.calib_batches=1",
         "quant.default.w_bits=4", "quant.default.a_bits=4")  # fmt: skip
TIMES = {"wall_s", "seconds", "img_per_s", "train_seconds", "checkpoint"}


def strip(d):
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k not in TIMES}
    return d


class Died(BaseException):
    """The process 'dies' here (nothing after it runs)."""


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from hawq.config import CONF_DIR

    run = tmp_path_factory.mktemp("full")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.run_dir={run}", *SMOKE,
                                           "stages=[train,qat]"])  # fmt: skip
    return pipeline.run_pipeline(cfg)["stages"]


@pytest.mark.parametrize(("stage", "state", "key"), [("train", "train_state.pt", "epochs"),
                                                     ("qat", "qat_state.pt", "fp")])
def test_killed_before_the_record_keeps_state_and_metrics(make_cfg, monkeypatch, full, stage,
                                                          state, key):
    """Every artifact of ``stage`` written, the process dies before its record: the state
    file is still there, and the rerun ends with the uninterrupted run's metrics."""
    real = pipeline.record.commit

    def commit(ctx, name, *a, **kw):
        if name == stage:
            raise Died
        return real(ctx, name, *a, **kw)

    monkeypatch.setattr(pipeline.record, "commit", commit)
    with pytest.raises(Died):
        pipeline.run_pipeline(make_cfg(*SMOKE, "stages=[train,qat]"))
    monkeypatch.setattr(pipeline.record, "commit", real)
    run = make_cfg(*SMOKE).paths.run_dir
    from pathlib import Path

    assert (Path(run) / state).is_file()
    res = pipeline.run_pipeline(make_cfg(*SMOKE, "stages=[train,qat]"))["stages"]
    assert key in res[stage] and strip(res[stage]) == strip(full[stage])
    assert not (Path(run) / state).exists()


def test_killed_after_the_record_before_cleanup_skips_and_removes_state(make_cfg, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setattr(Context, "record_written", lambda self: (_ for _ in ()).throw(Died))
    with pytest.raises(Died):
        pipeline.run_pipeline(make_cfg(*SMOKE, "stages=[train]"))
    assert (tmp_path / "run" / "train_state.pt").is_file()
    monkeypatch.undo()
    res = pipeline.run_pipeline(make_cfg(*SMOKE, "stages=[train]"))["stages"]
    assert res["train"]["epochs"] == 2
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_temp_files_found_under_the_lock_are_removed_however_young(tmp_path):
    (tmp_path / "sub").mkdir()
    young = [tmp_path / ".train_state.pt.abc123.tmp", tmp_path / "sub" / ".hessian.json.x.tmp"]
    for p in young:
        p.write_bytes(b"half a write")
    keep = tmp_path / "notes.tmp"  # not an atomic write's temp (no leading dot)
    keep.write_text("mine")
    with RunDirLock(tmp_path):
        assert not any(p.exists() for p in young)
    assert keep.exists()
