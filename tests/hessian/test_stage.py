"""Stage ``hessian`` end to end on the smoke config (tiny ViT, synthetic data)."""

from __future__ import annotations

import pytest

from hawq.errors import HawqError
from hawq.hessian import load_hessian_report
from hawq.models import ViT, op_inventory
from hawq.pipeline import run_pipeline

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
