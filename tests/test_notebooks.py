"""Every notebook runs top to bottom on its tiny default config (nbclient, fresh kernel)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from .conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NB_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebooks_match_their_generator(tmp_path):
    written = _generator().write_all(tmp_path)
    assert sorted(p.name for p in written) == NOTEBOOKS == [
        "01_loss_landscape.ipynb", "02_hessian_spectrum.ipynb", "03_bit_allocation.ipynb"]
    for p in written:
        fresh, stored = nbformat.read(p, 4), nbformat.read(NB_DIR / p.name, 4)
        assert [c.source for c in fresh.cells] == [c.source for c in stored.cells], p.name
        assert not any(c.get("outputs") for c in stored.cells), f"{p.name} saved with outputs"
        assert "parameters" in stored.cells[1].metadata.get("tags", [])


@pytest.mark.parametrize("name", NOTEBOOKS)  # 15-25 s each on 2 cores: in the default run
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NB_DIR / name, 4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert images, "no plot displayed"
    assert list((tmp_path / "runs").glob("nb_*/results.json"))
