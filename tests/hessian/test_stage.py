"""Stage ``hessian`` end to end on the smoke config (tiny ViT, synthetic data)."""

from __future__ import annotations

import pytest
import torch

from hawq.checkpoint import build_model, save_model
from hawq.errors import HawqError
from hawq.hessian import load_hessian_report
from hawq.models import ViT, op_inventory
from hawq.pipeline import run_pipeline

from .cases import func_looks_faster

FAST = (
    "experiment=smoke",
    "data.train_subset=256",
    "data.test_subset=64",
    "train.epochs=1",
    "hessian.batch_size=16",
    "hessian.min_samples=3",
    "hessian.max_samples=6",
    "hessian.max_iter=5",
    "hessian.density_steps=4",
    "hessian.backend=double_backward",
)


def test_train_then_hessian_writes_report_and_plots(make_cfg, tmp_path):
    res = run_pipeline(make_cfg(*FAST, "stages=[train,hessian]"))
    run_dir = tmp_path / "run"
    rep = load_hessian_report(run_dir / "hessian.json")
    vit = ViT(dim=64, depth=2, heads=4, mlp_dim=128)
    inv = op_inventory(vit, (3, 32, 32))
    model_ops = list(vit.named_modules())
    assert list(rep["ops"]) == [i.name for i in inv]  # network order, all 14 ops
    assert rep["backend"] == "double_backward" and rep["estimator"] == "sandwich"
    assert rep["trace_block"] == "weight" and rep["eig_which"] == "LA"
    assert rep["sketch"] == 8 and rep["hvp_products"] >= 16 + 6  # smoke: hessian.sketch=8
    assert rep["batch_size"] == 16 and rep["model"] == "hawq.models.vit.ViT"
    for info in inv:
        e = rep["ops"][info.name]
        assert e["kind"] == info.kind and e["macs"] == info.macs
        if info.kind == "matmul":
            assert e["numel"] == 0 and e["trace"] is None and set(e["act_trace"]) == {"a", "b"}
        else:
            assert e["numel"] == info.params and e["trace_samples"] == 6
            assert len(e["eigenvalues"]) == 1 and e["eig_iterations"] <= 6
            assert e["lambda_max"] == e["eigenvalues"][0] and len(e["eig_converged"]) == 1
            weight = dict(model_ops)[info.name].weight
            assert e["trace_numel"] == weight.numel() < e["numel"]  # weight block, no bias
            assert e["trace_undetermined"] == (abs(e["trace"]) < 2 * e["trace_stderr"])
            assert set(e["act_trace"]) == {"x"} and e["act_numel"]["x"] > 0
    for name in ("trace", "trace_per_param", "eigenvalue", "act_trace", "density"):
        assert (run_dir / f"hessian_{name}.png").stat().st_size > 1000
    assert res["stages"]["hessian"]["trace_samples"] == 6
    # alone from the checkpoint, elsewhere; skipped when present
    other = tmp_path / "other"
    given = f"paths.checkpoint={run_dir}/model.pt"
    alone_args = (*FAST, "stages=[hessian]", given, "hessian.estimator=hutchpp",
                  "hessian.sketch=2", "hessian.activation=false", "hessian.top_k=0",
                  "hessian.density=false")  # fmt: skip
    run_pipeline(make_cfg(*alone_args, run_dir=other))
    alone = load_hessian_report(other / "hessian.json")
    assert alone["estimator"] == "hutchpp" and alone["ops"]["head"]["eigenvalues"] is None
    mtime = (other / "hessian.json").stat().st_mtime_ns
    run_pipeline(make_cfg(*alone_args, run_dir=other))  # same config and checkpoint: skipped
    assert (other / "hessian.json").stat().st_mtime_ns == mtime
    run_pipeline(make_cfg(*FAST, "stages=[hessian]", given, run_dir=other))  # config changed
    assert load_hessian_report(other / "hessian.json")["estimator"] == "sandwich"  # the default


@pytest.mark.parametrize(("override", "message"), [
    ("hessian.estimator=exact", "hessian.estimator='exact' is invalid"),
    ("hessian.rtol=0", "hessian.rtol=0"),
    ("hessian.batches=1000", "hessian.batches=1000 but the train split has only"),
])  # fmt: skip
def test_bad_config_is_one_line_error(make_cfg, tmp_path, override, message):
    run_pipeline(make_cfg(*FAST, "stages=[train]"))
    with pytest.raises(HawqError, match=message):
        run_pipeline(make_cfg(*FAST, "stages=[hessian]", override))
    assert not (tmp_path / "run" / "hessian.json").exists()


def test_auto_backend_is_recorded_and_timing_does_not_change_the_report(make_cfg, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """Issue 29: a rerun after kill -9 said ``backend: func`` where the first run said
    ``double_backward`` (``auto`` was decided by timing). The hessian stage alone on an
    untrained smoke checkpoint, ``backend=auto``: once plainly and once on a clock where
    ``func`` looks 1000x faster; the same backend and the same hessian.json (but wall_s)."""
    args = ("experiment=smoke", "stages=[hessian]", "data.train_subset=64",
            "data.test_subset=32", "hessian.batch_size=8", "hessian.min_samples=3",
            "hessian.max_samples=6", "hessian.sketch=2", "hessian.top_k=0",
            "hessian.activation=false", "hessian.density=false", "hessian.backend=auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 5x faster than two contending threads on the shared CPU
    try:
        _run_twice(make_cfg, tmp_path, monkeypatch, args)
    finally:
        torch.set_num_threads(threads)


def _run_twice(make_cfg, tmp_path, monkeypatch, args) -> None:
    cfg = make_cfg(*args)
    ckpt = save_model(tmp_path / "model.pt", build_model(cfg.model), cfg.model)
    reports = []
    for name in ("plain", "func_looks_faster"):
        if name == "func_looks_faster":
            func_looks_faster(monkeypatch)
        run_pipeline(make_cfg(*args, f"paths.checkpoint={ckpt}", run_dir=tmp_path / name))
        rep = load_hessian_report(tmp_path / name / "hessian.json")
        reports.append({k: v for k, v in rep.items() if k != "wall_s"})
    plain, timed = reports
    assert plain["backend"] == "double_backward" and plain["backend_requested"] == "auto"
    assert plain["backend_choice"] == "auto: double backward runs"
    assert timed == plain  # bit for bit: every trace, stderr and count
