"""A user's install: configs inside the package, the console script, a wheel in a fresh venv."""

from __future__ import annotations

import configparser
import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hawq.run import CONF_DIR

from .conftest import REPO

SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HAWQ_DEBUG")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_configs_live_at_the_top_level_and_package_data_ships_them():
    """One copy of every YAML, in the repository's conf/; setup.py maps it onto the package
    hawq.conf and the package_data globs cover every file, so a wheel carries them all."""
    assert CONF_DIR == (REPO / "conf").resolve()
    assert not (REPO / "hawq" / "conf").exists(), "a second copy of the configs"
    globs = SETUP["options.package_data"]["hawq.conf"].split()
    files = [p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")]
    assert "config.yaml" in files and "experiment/smoke.yaml" in files
    missed = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/")
                                          for g in globs)]  # fmt: skip
    assert not missed, f"not shipped in a wheel: {missed}"
    setup_py = (REPO / "setup.py").read_text()
    assert '"hawq.conf": "conf"' in setup_py and '"hawq.conf"]' in setup_py


def test_console_entry_point_runs_from_another_directory(tmp_path):
    """``hawq.run:main`` imported (not ``__main__``), cwd elsewhere: Hydra finds the configs."""
    entry = SETUP["options.entry_points"]["console_scripts"].strip()
    assert entry == "hawq = hawq.run:main"
    code = "import sys; from hawq.run import main; sys.argv[0] = 'hawq'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "--cfg", "job", "experiment=smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=_env(PYTHONPATH=str(REPO)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: smoke" in proc.stdout and "vit_tiny" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "--cfg job writes nothing"


def test_dev_extra_has_nbconvert_and_notebook_runs_are_ignored():
    dev = SETUP["options.extras_require"]["dev"]
    assert any(line.strip().startswith("nbconvert") for line in dev.splitlines())
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("notebooks/runs/nb_x/results.json", "runs/x/model.pt"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert proc.returncode == 0, f"{path} would show as untracked"


@pytest.mark.slow
def test_alloc_benchmark_writes_nothing_into_the_cwd(tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out" / "alloc.json"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_alloc.py"),
                           "--repeats", "1", "--warmup", "0", "--skip-stage", "--out", str(out)],
                          cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=_env(PYTHONPATH=str(REPO)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"benchmark": "alloc"' in out.read_text()
    assert list(cwd.iterdir()) == []


def _source_copy(dst: Path) -> Path:
    """The checkout's tracked and untracked-not-ignored files (no build litter in the repo)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    return dst


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the whole smoke pipeline: ~1 min idle, much longer on a busy CPU
def test_wheel_in_a_fresh_venv_runs_smoke_from_another_directory(tmp_path):
    """pip wheel -> venv (system torch reused, nothing downloaded) -> ``hawq experiment=smoke``."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the sources")
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(wheels), str(src)], check=True, capture_output=True,
                   timeout=600, env=_env())  # fmt: skip
    (wheel,) = wheels.glob("hawq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hawq/conf/config.yaml" in names and "hawq/conf/experiment/smoke.yaml" in names
    assert "hawq/conf/hydra/launcher/slurm.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)  # fmt: skip
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=600, env=_env())  # fmt: skip
    work = tmp_path / "elsewhere"  # neither the source nor the venv
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import hawq; print(hawq.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True, env=_env())  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), "the wheel, not the checkout"

    proc = subprocess.run([str(bindir / "hawq"), "experiment=smoke", "paths.runs=runs"],
                          cwd=work, capture_output=True, text=True, timeout=1800,
                          env=_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "runs" / "smoke"
    for artifact in ("model.pt", "hessian.json", "bits.yaml", "qat_model.pt",
                     "integer_model.pt", "landscape.json", "results.json"):  # fmt: skip
        assert (run / artifact).is_file(), artifact
    again = subprocess.run([str(py), "-m", "hawq.run", "experiment=smoke", "stages=[evaluate]",
                            "force=true"], cwd=work, capture_output=True, text=True,
                           timeout=600, env=_env())  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
