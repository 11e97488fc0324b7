"""Fixtures of the allocation tests."""

import pytest

from hawq.checkpoint import save_model

from .cases import TINY_VIT, tiny_vit, write_report


@pytest.fixture
def run_dir(tmp_path):
    """A run directory holding the tiny ViT checkpoint and a synthetic hessian.json."""
    d = tmp_path / "run"
    model = tiny_vit()
    save_model(d / "model.pt", model, {"_target_": "hawq.models.vit.ViT", **TINY_VIT})
    write_report(model, d / "hessian.json")
    return d
