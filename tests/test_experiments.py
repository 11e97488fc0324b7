"""experiments/: every rows.yaml parses, names existing experiments, and launchers compose."""

from __future__ import annotations

import re
import subprocess

import pytest

from hawq.report import load_rows, results_table
from hawq.run import CONF_DIR

from .conftest import REPO

STUDIES = sorted(p.parent.name for p in (REPO / "experiments").glob("*/rows.yaml"))
EXPERIMENTS = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}


def test_both_studies_present():
    assert STUDIES == ["resnet20_cifar", "torch_vit_cifar", "vit_cifar", "vit_cifar_cpu"]


@pytest.mark.parametrize("study", STUDIES)
def test_rows_name_existing_experiments(study, tmp_path):
    """Every rows*.yaml table and *.sh launcher of a study (GPU run_all.sh, CPU variants)."""
    folder = REPO / "experiments" / study
    tables, scripts = sorted(folder.glob("rows*.yaml")), sorted(folder.glob("*.sh"))
    assert "run_all.sh" in {p.name for p in scripts}
    text = "".join(p.read_text() for p in [*tables, *scripts])
    named = set(re.findall(r"experiment=([A-Za-z0-9_]+)", text))
    assert named and named <= EXPERIMENTS, named - EXPERIMENTS
    for path in tables:
        rows = load_rows(path)
        assert len({r.label for r in rows}) == len(rows), f"duplicate row labels in {path.name}"
        # with no runs every row reads "to run"
        table = results_table(rows, tmp_path).splitlines()[2:]
        assert len(table) == len(rows) and all("| to run | 0 |" in line for line in table)
    for path in scripts:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path.name


@pytest.mark.parametrize("launcher", ["joblib", "slurm"])
def test_launcher_configs_compose(launcher):
    if launcher == "slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=smoke"],
                      return_hydra_config=True)  # fmt: skip
    target = cfg.hydra.launcher._target_
    assert target.endswith("JoblibLauncher" if launcher == "joblib" else "SlurmLauncher")
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1
        assert str(cfg.hydra.launcher.submitit_folder).endswith(".submitit/%j")
