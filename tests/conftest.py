"""Shared fixtures and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CIFAR10_DIR = Path(os.environ.get("HAWQ_TEST_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/hawq-inductor-cache")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in interpreter mode, which triton reads once,
    # at import: set it before any test (or torch.compile) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 npz copy; tests using it skip when it is absent."""
    if not (CIFAR10_DIR / "cifar10_test.npz").is_file():
        pytest.skip(f"real CIFAR-10 not found in {CIFAR10_DIR}")
    return CIFAR10_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the Hydra config like the CLI does, with the run directory in ``tmp_path``."""
    from hydra import compose, initialize_config_dir

    def _make(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        from hawq.run import CONF_DIR

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[f"paths.run_dir={run_dir}", *overrides])

    return _make


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run ``python -m hawq.run ARGS`` in a subprocess; returns CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HAWQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hawq.run", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
