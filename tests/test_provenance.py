"""Provenance of a run: the commit of the package with ``+dirty`` only for changes inside it,
taken when the run starts (an edit of the tree during a long run is not what computed it)."""

import json
import shutil
import subprocess

import pytest
from hydra import compose, initialize_config_dir

from hawq.config import run_config
from hawq.provenance import git_hash
from hawq.stages import context as context_mod
from hawq.stages.context import Context

from .conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)  # fmt: skip


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "docs.md").write_text("results\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def head(repo):
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def test_clean_package_is_its_commit(repo):
    assert git_hash(repo / "pkg") == head(repo)


def test_edits_outside_the_package_do_not_make_it_dirty(repo):
    (repo / "docs.md").write_text("results, updated while a run goes on\n")
    (repo / "untracked.txt").write_text("scratch\n")
    assert git_hash(repo / "pkg") == head(repo)


def test_edit_inside_the_package_is_dirty(repo):
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert git_hash(repo / "pkg") == head(repo) + "+dirty"
    git(repo, "add", "pkg/code.py")  # staged counts too
    assert git_hash(repo / "pkg") == head(repo) + "+dirty"


def test_outside_a_repository_is_unknown(tmp_path):
    assert git_hash(tmp_path) == "unknown"


def test_results_keep_the_provenance_of_the_start(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"paths.run_dir={tmp_path}"])
    ctx = Context(cfg, run_config(cfg))
    at_start = ctx.provenance
    assert set(at_start) == {"versions", "git", "hardware"}
    later = {"versions": {}, "git": "feedface+dirty", "hardware": "elsewhere"}
    monkeypatch.setattr(context_mod, "provenance", lambda device: later)
    path = ctx.save_results("evaluate", {"acc": 1.0})
    assert json.loads(path.read_text())["provenance"] == at_start
