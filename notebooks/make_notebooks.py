"""Write the notebooks of this folder from the cell sources below (``python make_notebooks.py``).

Edit the cells here, not the ``.ipynb`` files, then rerun; the notebooks are saved
without outputs. Each starts with a ``parameters`` cell: by default it builds a tiny
run (smoke config, synthetic data, a few seconds of CPU); set ``RUN_DIR`` and
``OVERRIDES`` to a real run to plot its artifacts instead (stages whose outputs
exist are loaded, not recomputed).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

TINY = '''# Tiny default: synthetic data, a 1-block ViT, seconds on a CPU. For a real run use e.g.
# RUN_DIR = "../runs/vit_cifar"; OVERRIDES = ["experiment=vit_cifar"]
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
             "landscape.eig_max_iter=8", "landscape.quant_path_points=7"]''',
                      metadata={"tags": ["parameters"]}),
        new_code_cell('''from IPython.display import Image, display

from hawq.io import read_json
from hawq.report import run_stages
from hawq.viz.landscape import plot_1d, plot_2d, plot_op_rise, plot_quant_path

results, run_dir = run_stages(OVERRIDES + LANDSCAPE, ["train", "hessian", "landscape"], RUN_DIR)
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

results, run_dir = run_stages(OVERRIDES, ["train", "hessian"], RUN_DIR)
report = load_hessian_report(run_dir / "hessian.json")
print("run:", run_dir, "| estimator:", report["estimator"], "| whole trace:",
      report["whole_trace"])'''),
        new_markdown_cell("## Per-op top eigenvalue and trace"),
        new_code_cell('''for png in plot_report(report, run_dir, prefix="nb_hessian"):
    display(Image(str(png)))
for name, e in report["ops"].items():
    if e["eigenvalues"]:
        print(f"{name:28s} lambda_max {e['eigenvalues'][0]:10.4g}  trace {e['trace']:10.4g}")'''),
        new_markdown_cell("## SLQ spectral density of the whole model"),
        new_code_cell('''cfg = compose_config(OVERRIDES, run_dir)
data = instantiate(cfg.data)
model, _ = load_model(Path(cfg.paths.checkpoint), "cpu")
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
        new_code_cell('''from IPython.display import Image, display

from hawq.quant import load_plan
from hawq.report import budget_at, budget_range, run_stages
from hawq.viz.alloc import plot_frontier
from hawq.viz.report import plot_tradeoff

results, base = run_stages(OVERRIDES, ["train", "evaluate", "hessian"], RUN_DIR)
lo, hi = budget_range(base / "hessian.json", CANDIDATES, "bops")
print(f"run: {base} | BOPs range [{lo:.4g}, {hi:.4g}] G per image")'''),
        new_markdown_cell("## One allocation + PTQ per budget"),
        new_code_cell('''points, runs = [], {}
for f in FRACTIONS:
    budget = budget_at(lo, hi, f)
    res, d = run_stages(OVERRIDES + ALLOC + [
        f"paths.checkpoint={base / 'model.pt'}", f"alloc.hessian={base / 'hessian.json'}",
        f"alloc.bops={budget}"], ["alloc", "ptq"], base / f"alloc_bops_{f}")
    runs[f] = d
    bops = res["stages"]["alloc"]["totals"]["bops"]
    acc = res["stages"]["ptq"]["quantized"]["acc"]
    points.append((bops, acc))
    print(f"f={f}: budget {budget:.4g} -> BOPs {bops:.4g}, PTQ acc {acc:.2f}")
fp_acc = results["stages"]["evaluate"]["fp"]["acc"]
display(Image(str(plot_tradeoff({"hawq_v3 + PTQ": points}, "GBOPs / image",
                                 base / "nb_alloc_acc_vs_bops.png",
                                 reference={"FP": fp_acc}))))'''),
        new_markdown_cell("## The middle budget: plan per op and the sensitivity frontier"),
        new_code_cell('''mid = runs[FRACTIONS[len(FRACTIONS) // 2]]
display(Image(str(mid / "bits_per_op.png")))
plan, meta = load_plan(mid / "bits.yaml")
pts = [p for p in meta["frontier"]["points"] if p["cost"] is not None]
display(Image(str(plot_frontier(meta["frontier"]["budget"], [p["cost"] for p in pts],
                                [p["objective"] for p in pts],
                                (meta["totals"]["bops"], meta["objective"]),
                                path=mid / "nb_alloc_frontier.png"))))
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


if __name__ == "__main__":
    for p in write_all():
        print(p)
