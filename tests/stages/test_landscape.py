"""Stage ``landscape`` end to end on the smoke config: pipeline, then the CLI."""

from __future__ import annotations

import json

import pytest

from hawq.errors import HawqError
from hawq.pipeline import run_pipeline

from ..conftest import run_cli

TINY = ("experiment=smoke", "model.depth=1", "data.train_subset=128", "data.test_subset=64",
        "train.epochs=1")  # fmt: skip
LANDSCAPE = ("landscape.batch_size=32", "landscape.points_1d=5", "landscape.points_2d=3",
             "landscape.eig_max_iter=4", "landscape.quant_path_points=3",
             "landscape.bits=[2]")  # fmt: skip


def test_landscape_stage_and_cli(make_cfg, tmp_path):
    run_pipeline(make_cfg(*TINY, "stages=[train,ptq]", "quant.calib_batches=1"))
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, *LANDSCAPE, "stages=[landscape]", f"paths.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((run_dir / "landscape.json").read_text())
    names = {"landscape_1d_eig1.png", "landscape_1d_eig2.png", "landscape_1d_rand1.png",
             "landscape_1d_rand2.png", "landscape_2d_eig1_eig2.png",
             "landscape_2d_rand1_rand2.png", "landscape_quant_path.png",
             "landscape_op_rise.png"}  # fmt: skip
    assert set(rep["plots"]) == names
    assert all((run_dir / n).stat().st_size > 1000 for n in names)
    assert rep["versions"] == ["fp", "w2", "ptq"]  # ptq: the run's ptq_model.pt (W8A8 default)
    assert rep["quant_points"]["ptq"]["norm"] < rep["quant_points"]["w2"]["norm"]
    l0 = rep["fp"]["loss"]
    # every surface passes through the FP loss at the origin (odd grids contain 0)
    for k, s in rep["surfaces_1d"].items():
        assert s["curves"]["fp"]["loss"][2] == pytest.approx(l0, rel=1e-5), k
    for s in rep["surfaces_2d"].values():
        assert s["loss"]["fp"][1][1] == pytest.approx(l0, rel=1e-5)
    # the quantization path reaches L(W + delta) at t = 1 and starts at L0
    path, point = rep["quant_path"]["w2"], rep["quant_points"]["w2"]
    assert path["t"] == [0.0, 0.75, 1.5]
    assert path["loss"][0] == pytest.approx(l0, rel=1e-5)
    assert path["quadratic"][0] == pytest.approx(l0, rel=1e-12)
    assert 0.0 <= point["outside"] <= 1.0 and point["norm"] > 0
    assert set(point["coords"]) == {"eig1", "eig2", "rand1", "rand2"}
    assert abs(rep["eigen"]["values"][0]) >= abs(rep["eigen"]["values"][1])
    ops = rep["per_op"]["w2"]
    assert "head" in ops and all(r["lambda"] is None for r in ops.values())  # no hessian.json
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"]["landscape"]["evaluations"] == rep["evaluations"]
    # done: skipped on a second pipeline run
    mtime = (run_dir / "landscape.json").stat().st_mtime_ns
    run_pipeline(make_cfg(*TINY, *LANDSCAPE, "stages=[landscape]"))
    assert (run_dir / "landscape.json").stat().st_mtime_ns == mtime


def test_landscape_bad_config_one_line(make_cfg, tmp_path):
    with pytest.raises(HawqError, match="landscape.directions=.*allowed: a non-empty list"):
        run_pipeline(make_cfg(*TINY, "stages=[landscape]", "landscape.directions=[hessian]"))
    run_pipeline(make_cfg(*TINY, "stages=[train]"))
    with pytest.raises(HawqError, match="eigen_op='nope' is not an op.*available: .*head"):
        run_pipeline(make_cfg(*TINY, *LANDSCAPE, "stages=[landscape]", "landscape.eigen_op=nope"))
    assert not (tmp_path / "run" / "landscape.json").exists()
