"""Write the notebooks of this folder from the cell sources below (``python make_notebooks.py``;
``--execute`` also runs each on the published artifacts and saves it with its outputs,
as they are committed).

Edit the cells here, not the ``.ipynb`` files, then rerun. Each starts with a
``parameters`` cell: by default it opens the published artifacts of the second study
(``PUBLISHED``: a trained ViT's checkpoint, ``hessian.json`` and allocation runs; cells
that need images read CIFAR-10 from ``HAWQ_DATA``); ``PUBLISHED = None`` builds a tiny
synthetic run instead (seconds of CPU), or set ``RUN_DIR`` and ``OVERRIDES`` to a real
run of yours (stages whose outputs exist are loaded, not recomputed).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

TINY = '''# Default: the published artifacts of the second study (../experiments/torch_vit_cifar:
# a ViT from nn.TransformerEncoderLayer trained on CIFAR-10, FP 78.54%); cells that need
# images read CIFAR-10 from HAWQ_DATA. PUBLISHED = None: the tiny synthetic run below
# (seconds on a CPU); or a run of yours: PUBLISHED = None; RUN_DIR = "../runs/vit_cifar";
# OVERRIDES = ["experiment=vit_cifar"]
PUBLISHED = "../experiments/torch_vit_cifar/artifacts"
STUDY = ["experiment=torch_vit_cifar", "data.download=false"]  # the published runs' config
RUN_DIR = None  # None: runs/<name> under the working directory
OVERRIDES = ["experiment=smoke", "name={name}", "model.depth=1", "data.train_subset=256",
             "data.test_subset=128", "train.epochs=2", "hessian.batch_size=32",
             "hessian.min_samples=4", "hessian.max_samples=8", "hessian.max_iter=8",
             "hessian.density_steps=8"]'''

def landscape() -> list:
    return [
        new_markdown_cell(
            "# Loss landscape around the FP and quantized weights\n\n"
            "1D and 2D loss surfaces along the top Hessian eigenvectors (`eig1`, `eig2`) and "
            "along random filter-normalised directions (`rand1`, `rand2`, Li et al. 2018), for "
            "the FP model and its fake-quant versions (`w4`, `w2`: every op at 4 / 2 weight "
            "bits). Stars mark where the quantized weights `Q(W)` project on each direction. "
            "The last plots answer *does the sharper layer's quantization land higher?*: the "
            "loss rise of quantizing one op alone against that op's curvature. Everything "
            "comes from `landscape.json` (stage `landscape`; the CLI "
            "`python -m hawq.run ... stages=[landscape]` writes the same plots)."),
        new_code_cell(TINY.format(name="nb_landscape") + '''
LANDSCAPE = ["landscape.batch_size=64", "landscape.points_1d=9", "landscape.points_2d=5",
             "landscape.eig_max_iter=8", "landscape.quant_path_points=7"]
LANDSCAPE_PUBLISHED = ["landscape.batch_size=512", "landscape.points_1d=13",
                       "landscape.points_2d=9", "landscape.eig_max_iter=12",
                       "landscape.quant_path_points=9"]''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell('''import shutil
from pathlib import Path

from IPython.display import Image, display

from hawq.io import read_json
from hawq.report import run_stages
from hawq.viz.landscape import plot_1d, plot_2d, plot_op_rise, plot_quant_path

if PUBLISHED:  # the published FP checkpoint and its per-op curvature, CIFAR-10 test images
    art = Path(PUBLISHED).resolve()
    run_dir = Path("runs/nb_landscape_published").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(art / "torch_vit_cifar_hessian" / "hessian.json", run_dir / "hessian.json")
    ckpt = f"paths.checkpoint={art / 'torch_vit_cifar' / 'model.pt'}"
    results, run_dir = run_stages(STUDY + [ckpt] + LANDSCAPE_PUBLISHED, ["landscape"], run_dir)
else:
    results, run_dir = run_stages(OVERRIDES + LANDSCAPE, ["train", "hessian", "landscape"],
                                  RUN_DIR)
rep = read_json(run_dir / "landscape.json")
print("run:", run_dir, "| versions:", rep["versions"], "| FP loss", rep["fp"]["loss"])
print("eigenvalues of the directions:", rep["eigen"] and rep["eigen"]["values"])'''),
        new_markdown_cell("## 1D surfaces, one per direction"),
        new_code_cell('''points = rep["quant_points"]
for k, s in rep["surfaces_1d"].items():
    png = plot_1d({"t": s["t"], "label": f"t along {k}"},
                  {v: c["loss"] for v, c in s["curves"].items()},
                  {v: (p["coords"][k], p["loss"]) for v, p in points.items()},
                  f"loss along {k}", run_dir / f"nb_landscape_1d_{k}.png")
    display(Image(str(png)))'''),
        new_markdown_cell("## 2D surfaces (shared contour levels across versions)"),
        new_code_cell('''for key, s in rep["surfaces_2d"].items():
    a, b = s["axes"]
    png = plot_2d(s, s["loss"], {v: (p["coords"][a], p["coords"][b]) for v, p in points.items()},
                  f"loss on ({a}, {b})", run_dir / f"nb_landscape_2d_{key}.png", labels=(a, b))
    display(Image(str(png)))'''),
        new_markdown_cell(
            "## Where quantization lands\n\n`outside` is the share of `||Q(W) - W||` outside "
            "the plotted directions' span: a 2D picture shows only that projection. The path "
            "plot follows the segment from `W` to `Q(W)` itself, beside its second-order model "
            "`L0 + t g.d + t^2 d'Hd / 2`."),
        new_code_cell('''for v, p in points.items():
    print(f"{v}: L(Q(W)) = {p['loss']:.4f}, ||Q(W)-W|| = {p['norm']:.3g}, "
          f"outside share = {p['outside']:.3f}")
display(Image(str(plot_quant_path(rep["quant_path"], "FP -> Q(W)",
                                  run_dir / "nb_landscape_quant_path.png"))))'''),
        new_markdown_cell(
            "## Does the sharper op's quantization land higher?\n\nOne op quantized at a "
            "time; x: the op's top Hessian eigenvalue (from `hessian.json`) or the curvature "
            "along its quantization offset; y: the measured loss rise. Spearman rank "
            "correlations per version are printed below."),
        new_code_cell('''per_op = rep["per_op"]
has_lambda = any(r["lambda"] is not None for rows in per_op.values() for r in rows.values())
key = "lambda" if has_lambda else "curvature"
display(Image(str(plot_op_rise(per_op, key, f"loss rise vs {key}",
                               run_dir / "nb_landscape_op_rise.png"))))
for v, c in rep["spearman"].items():
    print(v, {k: None if x is None else round(x, 3) for k, x in c.items()})'''),
    ]


def hessian_spectrum() -> list:
    return [
        new_markdown_cell(
            "# Hessian spectrum\n\nPer-op top eigenvalues and traces from `hessian.json` "
            "(stage `hessian`), and the SLQ eigenvalue density of the whole model's Hessian "
            "computed here with `hawq.hessian.spectral_density`."),
        new_code_cell(TINY.format(name="nb_hessian") + '''
DENSITY_STEPS = 16     # Lanczos steps per SLQ run
DENSITY_VECTORS = 1    # SLQ runs (averaged)
PER_LAYER = False      # also one density per op''', metadata={"tags": ["parameters"]}),
        new_code_cell('''from pathlib import Path

from hydra.utils import instantiate
from IPython.display import Image, display
from torch import nn

from hawq.checkpoint import load_model
from hawq.hessian import load_hessian_report, spectral_density
from hawq.report import compose_config, run_stages
from hawq.viz.hessian import plot_density, plot_report

if PUBLISHED:  # the published hessian.json and FP checkpoint; CIFAR-10 for the density
    art = Path(PUBLISHED).resolve()
    run_dir = Path("runs/nb_hessian_published").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    report = load_hessian_report(art / "torch_vit_cifar_hessian" / "hessian.json")
    cfg = compose_config(STUDY, run_dir)
    checkpoint = art / "torch_vit_cifar" / "model.pt"
else:
    results, run_dir = run_stages(OVERRIDES, ["train", "hessian"], RUN_DIR)
    report = load_hessian_report(run_dir / "hessian.json")
    cfg = compose_config(OVERRIDES, run_dir)
    checkpoint = Path(cfg.paths.checkpoint)
print("run:", run_dir, "| estimator:", report["estimator"], "| whole trace:",
      report["whole_trace"])'''),
        new_markdown_cell("## Per-op top eigenvalue and trace"),
        new_code_cell('''for png in plot_report(report, run_dir, prefix="nb_hessian"):
    display(Image(str(png)))
for name, e in report["ops"].items():
    if e["eigenvalues"]:
        print(f"{name:28s} lambda_max {e['eigenvalues'][0]:10.4g}  trace {e['trace']:10.4g}")'''),
        new_markdown_cell("## SLQ spectral density of the whole model"),
        new_code_cell('''data = instantiate(cfg.data)
model, _ = load_model(checkpoint, "cpu")
model.eval()
hc = cfg.hessian
x, y = next(iter(data.eval_loader(hc.split, "cpu", hc.batch_size)))
dens = spectral_density(model, nn.CrossEntropyLoss(), [(x, y)], n_vectors=DENSITY_VECTORS,
                        steps=DENSITY_STEPS, seed=0, per_layer=PER_LAYER)
display(Image(str(plot_density(dens, run_dir / "nb_hessian_density.png"))))'''),
    ]


def bit_allocation() -> list:
    return [
        new_markdown_cell(
            "# Bit allocation\n\nThe per-op plan beside the ops' sensitivities (stage "
            "`alloc`), the exact-ILP frontier of predicted sensitivity vs BOPs, and measured "
            "PTQ accuracy vs BOPs for budgets at fractions of the BOPs range (the HAWQ-V3 "
            "parametrisation `B = B_min + f (B_max - B_min)`, `hawq.report.budget_range`)."),
        new_code_cell(TINY.format(name="nb_alloc") + '''
FRACTIONS = [0.25, 0.5, 0.75]   # of the BOPs range between all-4-bit and all-8-bit
CANDIDATES = [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]
ALLOC = ["alloc.frontier_points=6", "quant.calib_batches=2"]''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell('''from pathlib import Path

from IPython.display import Image, display

from hawq.io import read_json
from hawq.quant import load_plan
from hawq.report import budget_at, budget_range, run_stages
from hawq.viz.alloc import plot_frontier
from hawq.viz.report import plot_tradeoff

if PUBLISHED:  # the published runs: FP, curvature, and one allocation + PTQ per budget
    art = Path(PUBLISHED).resolve()
    base = Path("runs/nb_alloc_published").resolve()
    base.mkdir(parents=True, exist_ok=True)
    results = read_json(art / "torch_vit_cifar" / "results.json")
    hessian = art / "torch_vit_cifar_hessian" / "hessian.json"
else:
    results, base = run_stages(OVERRIDES, ["train", "evaluate", "hessian"], RUN_DIR)
    hessian = base / "hessian.json"
lo, hi = budget_range(hessian, CANDIDATES, "bops")
print(f"run: {base} | BOPs range [{lo:.4g}, {hi:.4g}] G per image")'''),
        new_markdown_cell("## One allocation + PTQ per budget"),
        new_code_cell('''def point(d: Path) -> tuple[float, float]:
    res = read_json(d / "results.json")["stages"]
    return res["alloc"]["totals"]["bops"], res["ptq"]["quantized"]["acc"]


series, runs = {"Hessian ILP (hawq_v3_act) + PTQ": []}, {}
for f in FRACTIONS:
    if PUBLISHED:
        d = art / f"torch_vit_cifar_hawq_bops{f}"
    else:
        _, d = run_stages(OVERRIDES + ALLOC + [
            f"paths.checkpoint={base / 'model.pt'}", f"alloc.hessian={hessian}",
            f"alloc.bops={budget_at(lo, hi, f)}"], ["alloc", "ptq"], base / f"alloc_bops_{f}")
    runs[f] = d
    series["Hessian ILP (hawq_v3_act) + PTQ"].append(point(d))
    print(f"f={f}: budget {budget_at(lo, hi, f):.4g} -> BOPs, PTQ acc", point(d))
if PUBLISHED:  # the same ILP and budgets on the Fisher ranking and on random sensitivities
    series["empirical-Fisher ILP + PTQ"] = [point(art / f"torch_vit_cifar_fisher_bops{f}")
                                            for f in FRACTIONS]
    for s in range(5):
        series[f"random sensitivities, draw {s}"] = [
            point(art / f"torch_vit_cifar_random{s}_bops{f}") for f in FRACTIONS]
fp_acc = results["stages"]["evaluate"]["fp"]["acc"]
display(Image(str(plot_tradeoff(series, "GBOPs / image", base / "nb_alloc_acc_vs_bops.png",
                                 reference={"FP": fp_acc}))))'''),
        new_markdown_cell("## The middle budget: plan per op and the sensitivity frontier"),
        new_code_cell('''mid = runs[FRACTIONS[len(FRACTIONS) // 2]]
display(Image(str(mid / "bits_per_op.png")))
plan, meta = load_plan(mid / "bits.yaml")
pts = [p for p in meta["frontier"]["points"] if p["cost"] is not None]
plot_frontier(meta["frontier"]["budget"], [p["cost"] for p in pts], [p["objective"] for p in pts],
              (meta["totals"]["bops"], meta["objective"]), path=base / "nb_alloc_frontier.png")
display(Image(str(base / "nb_alloc_frontier.png")))
for name, e in meta["ops"].items():
    print(f"{name:28s} {e['setting']:10s} sensitivity {e['sensitivity']:.4g}")'''),
    ]


NOTEBOOKS = {
    "01_loss_landscape.ipynb": landscape,
    "02_hessian_spectrum.ipynb": hessian_spectrum,
    "03_bit_allocation.ipynb": bit_allocation,
}


def write_all(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook (no outputs) into ``out_dir``."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells(), metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})  # fmt: skip
        path = out_dir / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def execute(path: Path, timeout: int = 3600) -> None:
    """Run ``path`` top to bottom from this folder (its default parameters: the published
    artifacts) and save it with its outputs, as committed."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, 4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()  # fmt: skip
    nbformat.write(nb, path)


if __name__ == "__main__":
    import sys

    for p in write_all():
        if "--execute" in sys.argv[1:]:  # HAWQ_DATA must point at CIFAR-10
            execute(p)
        print(p)
