"""The notebooks: committed executed on the published artifacts of the second study (their
plots show on the repository page without running anything), their sources those of the
generator, and each runs top to bottom on the tiny synthetic config (nbclient, fresh
kernel; ``PUBLISHED = None`` injected after the parameters cell)."""

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
        assert "parameters" in stored.cells[1].metadata.get("tags", [])
        assert 'PUBLISHED = "../experiments/torch_vit_cifar/artifacts"' in stored.cells[1].source
        shown = _images(stored)  # committed executed, on the published artifacts
        assert shown, f"{p.name} is committed without its plots"
        text = "".join(o.get("text", "") for c in stored.cells for o in c.get("outputs", []))
        assert "nb_" in text and "published" in text, f"{p.name} was not run on the artifacts"


def _images(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]  # fmt: skip


@pytest.mark.parametrize("name", NOTEBOOKS)  # 15-25 s each on 2 cores: in the default run
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NB_DIR / name, 4)
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = []
    nb.cells.insert(2, nbformat.v4.new_code_cell("PUBLISHED = None  # the tiny synthetic run"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    assert _images(nb), "no plot displayed"
    assert list((tmp_path / "runs").glob("nb_*/results.json"))
