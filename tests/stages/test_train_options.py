"""Training options that cost more than the default test run allows, or need a GPU."""

import pytest
import torch

from hawq.engine import cosine_multiplier
from hawq.pipeline import run_pipeline

SMOKE = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64", "train.epochs=1",
         "stages=[train,evaluate]")  # fmt: skip


def test_cosine_schedule_shape():
    total, warm = 100, 10
    lrs = [cosine_multiplier(s, total, warm, 0.1) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warm - 1] == pytest.approx(1.0)
    assert lrs[warm] == pytest.approx(1.0) and lrs[total] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))


@pytest.mark.slow
def test_torch_compile_training_matches_eager_closely(make_cfg, tmp_path):
    eager = run_pipeline(make_cfg(*SMOKE, "stages=[train]", run_dir=tmp_path / "eager"))
    compiled = run_pipeline(make_cfg(*SMOKE, "stages=[train]", "train.compile=true",
                                     run_dir=tmp_path / "compiled"))  # fmt: skip
    assert compiled["stages"]["train"]["train_loss"] == pytest.approx(
        eager["stages"]["train"]["train_loss"], rel=1e-3
    )


@pytest.mark.gpu
def test_bf16_training_on_gpu(make_cfg):
    res = run_pipeline(make_cfg(*SMOKE, "device=cuda", "train.amp=true"))
    assert res["stages"]["evaluate"]["fp"]["acc"] > 0
    assert torch.cuda.is_available()
