"""Stage ``landscape``: loss surfaces of the FP model and its fake-quant versions.

Inputs: ``paths.checkpoint`` (FP model); optionally the run's ``ptq_model.pt``
(``landscape.run_ptq``) and ``hessian.json`` (per-op top eigenvalues). On a
fixed probe set (``landscape.batches`` x ``batch_size`` images of ``split``):

* directions: the top-2 Hessian eigenvectors (``eigen``: ``eig1``, ``eig2``) and
  two random filter-normalised ones (``random``: ``rand1``, ``rand2``), see
  :mod:`hawq.analysis.landscape`;
* versions: ``fp``, ``w<b>`` for every ``landscape.bits`` (all ops at ``b`` weight
  bits, activations ``a_bits``; PTQ-calibrated, fixed weight steps) and ``ptq``;
* 1D surfaces along each direction and 2D surfaces on each pair, for every
  version, with the coordinates of each version's :math:`Q(W) - W` marked;
* the path :math:`L(W + t(Q(W) - W))`, :math:`t \\in [0, 1.5]`, beside its
  second-order model; per op, the rise from quantizing only that op vs its top
  eigenvalue (Spearman rank correlation in the metrics).

Outputs: ``landscape.json`` (every grid, axis and point) and ``landscape_*.png``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from hawq.analysis import (
    LossProbe,
    eigen_directions,
    filter_normalized,
    op_parameters,
    op_quant_rise,
    quant_offset,
    quant_point,
    second_order,
    spearman,
    surface_1d,
    surface_2d,
)
from hawq.analysis.config import LandscapeConfig
from hawq.errors import HawqError, choices
from hawq.hessian.report import read_hessian
from hawq.io import write_json
from hawq.quant import calibrate, check_ready, load_quantized, quantize_
from hawq.quant.config import default_setting
from hawq.quant.plan import OpSetting, Plan
from hawq.stages.context import Context
from hawq.stages.contract import HESSIAN, PTQ_MODEL, Contract, checkpoint, run_files
from hawq.viz.landscape import plot_1d, plot_2d, plot_op_rise, plot_quant_path

log = logging.getLogger("hawq")
OUT = "landscape.json"
SCHEMA = 1


def _base_setting(ctx: Context, lc: LandscapeConfig) -> OpSetting:
    quant = ctx.cfg.get("quant")
    return replace(default_setting(quant.default if quant else None), granularity=lc.granularity)


def quantized_versions(ctx: Context, lc: LandscapeConfig, model: nn.Module) -> dict[str, nn.Module]:
    """``w<b>[a<a>]`` fake-quant copies of ``model`` (and the run's ``ptq`` model)."""
    base = _base_setting(ctx, lc)
    quant = ctx.cfg.get("quant")
    fold_bn = bool(quant.get("fold_bn", True)) if quant else True
    calib_batches = int(quant.get("calib_batches", 8)) if quant else 8
    out: dict[str, nn.Module] = {}
    for b in lc.bits:
        name = f"w{b}" + (f"a{lc.a_bits}" if lc.a_bits is not None else "")
        q = copy.deepcopy(model)
        quantize_(q, Plan(default=replace(base, w_bits=b, a_bits=lc.a_bits)), None, fold_bn)
        calib = ctx.data.eval_loader("train", ctx.device, lc.batch_size) if lc.a_bits else []
        calibrate(q, calib, calib_batches if lc.a_bits else 0)
        check_ready(q)
        out[name] = q.eval()
    ptq = ctx.path(PTQ_MODEL)
    if lc.run_ptq and ptq.is_file():
        q, _, _ = load_quantized(ptq, ctx.device)
        out["ptq"] = q.eval()
    return out


def _span(base: float, coords: list[float], cover: bool) -> float:
    """Half-width of an axis: ``base``, widened to 1.2x the farthest quantized coordinate."""
    far = max((abs(c) for c in coords), default=0.0)
    return max(base, 1.2 * far) if cover and far > 0 else base


def _eigenvalues_from_report(ctx: Context) -> dict[str, float]:
    path = ctx.path(HESSIAN)
    if not path.is_file():
        return {}
    ops = read_hessian(path).ops
    return {n: op.eigenvalues[0] for n, op in ops.items() if op.eigenvalues}


CONTRACT = Contract(
    ("seed", "data", "quant", "landscape"), (checkpoint, run_files(PTQ_MODEL, HESSIAN))
)


def run(ctx: Context) -> dict[str, Any]:
    lc = ctx.group("landscape")
    model = ctx.load_fp_model()
    batches = _probe_batches(ctx, lc)
    loss_fn = ctx.loss_fn()
    probe = LossProbe(batches, loss_fn)
    loss0, acc0 = probe(model)
    versions = quantized_versions(ctx, lc, model)
    deltas = {name: quant_offset(q) for name, q in versions.items()}
    directions, base_span, eig_meta = _directions(model, loss_fn, batches, lc)
    points = {name: quant_point(model, probe, d, directions) for name, d in deltas.items()}
    spans = {
        k: _span(base_span[k], [p["coords"][k] for p in points.values()], lc.cover_quant)
        for k in directions
    }
    models = {"fp": model, **versions}
    plots: list = []
    surf1 = _surfaces_1d(ctx, lc, models, probe, directions, spans, points, plots)
    surf2 = _surfaces_2d(ctx, lc, models, probe, directions, spans, points, plots)
    paths = _quant_paths(ctx, lc, model, loss_fn, batches, probe, deltas, loss0, plots)
    per_op, corr = _per_op(ctx, lc, model, probe, deltas, plots) if lc.per_op else ({}, {})
    report = {
        "schema": SCHEMA,
        "checkpoint": str(ctx.checkpoint),
        "probe": {
            "split": lc.split,
            "batches": lc.batches,
            "batch_size": lc.batch_size,
            "samples": sum(len(y) for _, y in batches),
        },
        "seed": lc.seed,
        "fp": {"loss": loss0, "acc": acc0},
        "eigen": eig_meta,
        "random": {
            "seed": [lc.seed + 1, lc.seed + 2],
            "normalisation": "filter (Li et al. 2018)",
            "bias": "zero",
        }
        if "random" in lc.directions
        else None,
        "versions": list(models),
        "quant_points": points,
        "surfaces_1d": surf1,
        "surfaces_2d": surf2,
        "quant_path": paths,
        "per_op": per_op,
        "spearman": corr,
        "evaluations": probe.calls,
        "plots": [p.name for p in plots],
    }
    write_json(ctx.path(OUT), report)
    log.info(
        "landscape: %d loss evaluations, wrote %s and %d plots",
        probe.calls,
        ctx.path(OUT),
        len(plots),
    )
    return {
        "report": str(ctx.path(OUT)),
        "fp_loss": loss0,
        "eigenvalues": eig_meta["values"] if eig_meta else None,
        "quant_loss": {v: p["loss"] for v, p in points.items()},
        "quant_outside_share": {v: p["outside"] for v, p in points.items()},
        "spearman": corr,
        "evaluations": probe.calls,
        "plots": len(plots),
    }


def _probe_batches(ctx: Context, lc: LandscapeConfig) -> list:
    """The fixed batches every loss evaluation of the stage runs on."""
    loader = ctx.data.eval_loader(lc.split, ctx.device, lc.batch_size)
    if lc.batches > len(loader):
        raise HawqError(
            f"landscape.batches={lc.batches} but the {lc.split} split has only "
            f"{len(loader)} batches of {lc.batch_size}"
        )
    return [b for _, b in zip(range(lc.batches), loader)]


def _directions(
    model: nn.Module, loss_fn, batches: list, lc: LandscapeConfig
) -> tuple[dict, dict, dict | None]:
    """``(directions, base spans, eigen metadata)``: the top-2 Hessian eigenvectors (of the
    model or of ``landscape.eigen_op``) and/or two filter-normalised random directions."""
    directions, base_span, eig_meta = {}, {}, None
    op_names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in op_parameters(model)))
    if lc.eigen_op is not None and lc.eigen_op not in op_names:
        raise HawqError(
            f"landscape.eigen_op={lc.eigen_op!r} is not an op with weights; "
            f"available: {choices(op_names)}"
        )
    if "eigen" in lc.directions:
        ed = eigen_directions(
            model,
            loss_fn,
            batches,
            top_k=2,
            op=lc.eigen_op,
            method=lc.eig_method,
            tol=lc.eig_tol,
            max_iter=lc.eig_max_iter,
            seed=lc.seed,
        )
        eig_meta = {
            "values": ed.values,
            "residuals": ed.residuals,
            "products": ed.products,
            "scope": ed.scope,
            "method": lc.eig_method,
        }
        for i, (lam, d) in enumerate(zip(ed.values, ed.directions), start=1):
            directions[f"eig{i}"] = d
            base_span[f"eig{i}"] = math.sqrt(2 * lc.eigen_rise / abs(lam)) if lam else 1.0
    if "random" in lc.directions:
        weights = op_parameters(model)
        for i in (1, 2):
            directions[f"rand{i}"] = filter_normalized(weights, seed=lc.seed + i)
            base_span[f"rand{i}"] = lc.span_random
    return directions, base_span, eig_meta


def _surfaces_1d(ctx, lc, models, probe, directions, spans, points, plots) -> dict:
    """Loss and accuracy of every model version along each direction (one plot each)."""
    surf1 = {}
    for k, d in directions.items():
        ts = np.linspace(-spans[k], spans[k], lc.points_1d).tolist()
        curves = {v: surface_1d(m, probe, d, ts) for v, m in models.items()}
        surf1[k] = {"t": ts, "span": spans[k], "curves": curves}
        plots.append(
            plot_1d(
                {"t": ts, "label": f"t along {k}"},
                {v: c["loss"] for v, c in surf1[k]["curves"].items()},
                {v: (p["coords"][k], p["loss"]) for v, p in points.items()},
                f"loss along {k} (probe: {lc.batches}x{lc.batch_size} {lc.split})",
                ctx.run_dir / f"landscape_1d_{k}.png",
            )
        )
    return surf1


def _surfaces_2d(ctx, lc, models, probe, directions, spans, points, plots) -> dict:
    """Loss grids on the (eig1, eig2) and (rand1, rand2) planes (``landscape.points_2d``)."""
    surf2 = {}
    pairs = [
        (a, b)
        for a, b in (("eig1", "eig2"), ("rand1", "rand2"))
        if a in directions and b in directions
    ]
    for a, b in pairs if lc.points_2d else []:
        al = np.linspace(-spans[a], spans[a], lc.points_2d).tolist()
        be = np.linspace(-spans[b], spans[b], lc.points_2d).tolist()
        grids = {
            v: surface_2d(m, probe, directions[a], directions[b], al, be) for v, m in models.items()
        }
        key = f"{a}_{b}"
        surf2[key] = {
            "alpha": al,
            "beta": be,
            "axes": [a, b],
            "loss": {v: g["loss"] for v, g in grids.items()},
            "acc": {v: g["acc"] for v, g in grids.items()},
        }
        plots.append(
            plot_2d(
                surf2[key],
                surf2[key]["loss"],
                {v: (p["coords"][a], p["coords"][b]) for v, p in points.items()},
                f"loss on ({a}, {b})",
                ctx.run_dir / f"landscape_2d_{key}.png",
                labels=(a, b),
            )
        )
    return surf2


def _quant_paths(ctx, lc, model, loss_fn, batches, probe, deltas, loss0, plots) -> dict:
    """The loss along FP -> each quantized version's weights, measured and to 2nd order."""
    paths = {}
    for v, d in deltas.items():
        ts = np.linspace(0.0, 1.5, lc.quant_path_points).tolist()
        lin, quad = second_order(model, loss_fn, batches, d)
        paths[v] = {
            **surface_1d(model, probe, d, ts),
            "g_dot_delta": lin,
            "delta_H_delta": quad,
            "quadratic": [loss0 + t * lin + 0.5 * t * t * quad for t in ts],
        }
    if paths:
        plots.append(
            plot_quant_path(
                paths,
                "FP -> quantized weights: measured vs 2nd order",
                ctx.run_dir / "landscape_quant_path.png",
            )
        )
    return paths


def _per_op(ctx, lc, model, probe, deltas, plots) -> tuple[dict, dict]:
    """The loss rise of quantizing one op at a time, against its curvature (Spearman)."""
    per_op, corr = {}, {}
    lams = {} if lc.per_op_eig_iter else _eigenvalues_from_report(ctx)
    for v, d in deltas.items():
        rows = op_quant_rise(
            model, probe, d, eig_max_iter=lc.per_op_eig_iter, eig_tol=lc.eig_tol, seed=lc.seed
        )
        for op, r in rows.items():
            r.setdefault("lambda", lams.get(op))
        per_op[v] = rows
        with_lam = [r for r in rows.values() if r["lambda"] is not None]
        corr[v] = {
            "rise_vs_lambda": spearman(
                [abs(r["lambda"]) for r in with_lam], [r["rise"] for r in with_lam]
            ),
            "rise_vs_curvature": spearman(
                [r["curvature"] for r in rows.values()], [r["rise"] for r in rows.values()]
            ),
            "rise_vs_predicted": spearman(
                [r["predicted"] for r in rows.values()], [r["rise"] for r in rows.values()]
            ),
        }
    has_lam = any(r["lambda"] is not None for rows in per_op.values() for r in rows.values())
    key = "lambda" if has_lam else "curvature"
    if per_op:
        plots.append(
            plot_op_rise(
                per_op,
                key,
                f"quantizing one op: loss rise vs {key}",
                ctx.run_dir / "landscape_op_rise.png",
            )
        )
    return per_op, corr
