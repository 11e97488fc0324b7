"""experiments/: every rows.yaml parses, names existing experiments, and launchers compose."""

from __future__ import annotations

import re
import subprocess

import pytest

from hawq.report import load_rows, results_table

from .conftest import REPO

STUDIES = sorted(p.parent.name for p in (REPO / "experiments").glob("*/rows.yaml"))
EXPERIMENTS = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}


def test_both_studies_present():
    assert STUDIES == ["resnet20_cifar", "vit_cifar"]


@pytest.mark.parametrize("study", STUDIES)
def test_rows_name_existing_experiments(study, tmp_path):
    folder = REPO / "experiments" / study
    rows = load_rows(folder / "rows.yaml")
    assert len({r.label for r in rows}) == len(rows), "duplicate row labels"
    text = (folder / "rows.yaml").read_text() + (folder / "run_all.sh").read_text()
    named = set(re.findall(r"experiment=([A-Za-z0-9_]+)", text))
    assert named and named <= EXPERIMENTS, named - EXPERIMENTS
    # with no runs every row reads "to run"
    table = results_table(rows, tmp_path).splitlines()[2:]
    assert len(table) == len(rows) and all("| to run | 0 |" in line for line in table)
    assert subprocess.run(["bash", "-n", str(folder / "run_all.sh")]).returncode == 0


@pytest.mark.parametrize("launcher", ["joblib", "slurm"])
def test_launcher_configs_compose(launcher):
    if launcher == "slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=smoke"],
                      return_hydra_config=True)  # fmt: skip
    target = cfg.hydra.launcher._target_
    assert target.endswith("JoblibLauncher" if launcher == "joblib" else "SlurmLauncher")
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1
        assert str(cfg.hydra.launcher.submitit_folder).endswith(".submitit/%j")
