"""Stage ``alloc``: ``hessian.json`` (+ FP model, calibration batches) -> ``bits.yaml`` + PNGs.

Chooses one candidate setting per quantizable op with the exact ILP of
:mod:`hawq.alloc.ilp` under the configured budgets (``cfg.alloc``), writes the plan
with its provenance (method, budgets, objective, solver status, cost totals,
per-op predicted sensitivity, the sensitivity-vs-budget frontier) and two plots:
``<out>_per_op.png`` (bits per op beside sensitivity) and ``<out>_frontier.png``.
An infeasible budget ends the run with one line naming the smallest feasible value.
Skipped when the output exists and was made with the same ``alloc`` config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from hawq.alloc import allocate, frontier, read_hessian
from hawq.alloc.allocate import choices_per_op, resolve_pins
from hawq.alloc.config import AllocConfig
from hawq.alloc.costs import LatencyTable
from hawq.alloc.sensitivity import ACT_METHODS, measured_sensitivity
from hawq.errors import HawqError, choices
from hawq.io import read_json, write_json
from hawq.models.ops import quantizable_ops
from hawq.quant.config import default_setting
from hawq.quant.plan import OpSetting, save_plan
from hawq.stages.context import Context
from hawq.stages.contract import (
    HESSIAN,
    Contract,
    checkpoint,
    configured,
    latency_out,
    latency_table,
)
from hawq.viz.alloc import budget_title, plot_allocation, plot_frontier

log = logging.getLogger("hawq")


def _config(ctx: Context) -> AllocConfig:
    return ctx.group("alloc")


def _config_dict(cfg: AllocConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _base(ctx: Context, cfg: AllocConfig) -> OpSetting:
    """``alloc.base``, else ``quant.default`` (the settings PTQ/QAT apply), else defaults."""
    if cfg.base is None:
        quant = ctx.cfg.get("quant")
        return default_setting(quant.default if quant else None)
    try:
        return OpSetting(**dict(cfg.base))
    except TypeError as e:
        raise HawqError(f"bad config alloc.base: {e}") from e


def _latency_table(ctx: Context, cfg: AllocConfig) -> LatencyTable | None:
    """``alloc.latency_table``, else the run's ``latency.json`` (stage ``latency``) when a
    latency budget is set."""
    if cfg.latency_table:
        return LatencyTable.load(Path(cfg.latency_table).expanduser())
    if cfg.latency_us is None:
        return None
    path = latency_out(ctx)
    if not path.is_file():
        raise HawqError(
            f"alloc.latency_us needs a latency table: none at {path}; run stage "
            "latency first (stages=[latency,alloc]) or set alloc.latency_table"
        )
    return LatencyTable.load(path)


def _measured(ctx: Context, cfg: AllocConfig, report, model, base: OpSetting):
    """Single-op PTQ accuracy drops (one evaluation per op and candidate)."""
    try:
        from hawq.quant.api import calibrate, quantize_
    except ImportError as e:
        raise HawqError(f"alloc.method=measured needs hawq.quant.api: {e}") from e
    from hawq.engine import evaluate

    pins = resolve_pins(list(report.ops), cfg.pins, cfg.pin_first, cfg.pin_last)
    cands = choices_per_op(report, cfg.candidates, pins)
    calib = ctx.data.eval_loader("train", ctx.device, batch_size=cfg.calib_batch_size)
    test = ctx.data.eval_loader(cfg.measured_split, ctx.device, batch_size=cfg.measured_batch_size)

    def quantize_fn(m, plan):
        quantize_(m, plan)
        calibrate(m, calib, max_batches=cfg.calib_batches)
        return m

    def evaluate_fn(m) -> float:
        return evaluate(m, test, ctx.device, desc="measured")["acc"]

    fp_acc, drops = measured_sensitivity(
        model, dict(zip(report.ops, cands, strict=True)), base, quantize_fn, evaluate_fn
    )
    return [drops[n] for n in report.ops], fp_acc


def _at_lowest_bits(problem, kinds: dict[str, str]) -> dict[str, float]:
    """Each op's sensitivity at its candidate with the fewest operand bits."""
    out = {}
    for i, (name, cs) in enumerate(zip(problem.ops, problem.choices, strict=True)):
        j = min(
            range(len(cs)),
            key=lambda j: (sum(cs[j].operand_bits(kinds[name])), -problem.sens[i][j]),
        )
        out[name] = float(problem.sens[i][j])
    return out


def _cache_key(
    ctx: Context, cfg: AllocConfig, base: OpSetting, fold_bn: bool, hessian_path: Path
) -> str:
    """Hash of everything the sensitivities depend on (inputs' contents, not budgets)."""
    ckpt = Path(str(ctx.cfg.paths.checkpoint)).expanduser()
    st = ckpt.stat() if ckpt.is_file() else None
    data = ctx.cfg.get("data")
    d = {
        "method": cfg.method,
        "candidates": _plain(cfg.candidates),
        "pins": _plain(cfg.pins),
        "pin_first": _plain(cfg.pin_first),
        "pin_last": _plain(cfg.pin_last),
        "base": base.as_dict(),
        "fold_bn": fold_bn,
        "seed": cfg.seed,
        "calib": [cfg.calib_batches, cfg.calib_batch_size, cfg.calib_images, cfg.calib_rel_se],
        "hessian": hashlib.sha256(hessian_path.read_bytes()).hexdigest(),
        "checkpoint": [str(ckpt.resolve()), st.st_size, st.st_mtime_ns] if st else None,
        "data": _plain(data) if data is not None else None,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _plain(v: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _cached_sens(path: Path, key: str, ops: list[str]):
    """Sensitivity arrays from ``path`` when its key matches, else None."""
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        if d.get("key") != key or list(d["sens"]) != ops:
            return None
        return [np.asarray(d["sens"][n], dtype=float) for n in ops]
    except (OSError, ValueError, KeyError, TypeError):
        return None


CONTRACT = Contract(
    ("seed", "data", "alloc", "quant.default"),
    (checkpoint, configured("alloc.hessian", HESSIAN), latency_table),
)


def run(ctx: Context) -> dict:
    t_stage = time.perf_counter()
    cfg = _config(ctx)
    hessian_path, report, model = _inputs(ctx, cfg)
    load_s = time.perf_counter() - t_stage
    base = _base(ctx, cfg)
    quant = ctx.cfg.get("quant")
    fold_bn = bool(quant.get("fold_bn", True)) if quant is not None else True
    sens, extra, cache = _known_sensitivities(ctx, cfg, report, model, base, fold_bn, hessian_path)
    calib = None
    if cfg.method in ACT_METHODS and sens is None:
        calib = ctx.data.eval_loader("train", ctx.device, batch_size=cfg.calib_batch_size)
    alloc = allocate(
        report,
        cfg.candidates,
        cfg.method,
        cfg.budgets,
        model=model,
        calib_batches=calib,
        max_batches=cfg.calib_batches,
        calib_images=cfg.calib_images,
        calib_rel_se=cfg.calib_rel_se,
        fold_bn=fold_bn,
        input_size=tuple(ctx.data.input_size),
        base=base,
        sens=sens,
        ties=cfg.ties,
        tie_groups=cfg.tie_groups,
        pins=cfg.pins,
        pin_first=cfg.pin_first,
        pin_last=cfg.pin_last,
        latency=_latency_table(ctx, cfg),
        avg_bits_by=cfg.avg_bits_by,
        seed=cfg.seed,
    )
    if cache is not None and sens is None:
        _write_sens_cache(cache, cfg, alloc)
    kind, points, frontier_s = _frontier(cfg, alloc)
    out = ctx.path(cfg.out)
    t_plots = time.perf_counter()
    if cfg.plots:
        _plots(cfg, alloc, report, kind, points, out.with_suffix(""))
    plots_s = time.perf_counter() - t_plots
    meta = {
        **alloc.meta,
        "config": _config_dict(cfg),
        **extra,
        "frontier": {"budget": kind, "points": [p.as_dict() for p in points]},
    }
    save_plan(out, alloc.plan, meta)  # last: the plan exists only when everything succeeded
    sol = alloc.solution
    log.info(
        "alloc: %s under %s -> objective %.4g, totals %s (solve %.3f s)",
        cfg.method,
        cfg.budgets,
        sol.objective,
        sol.totals,
        sol.solve_s,
    )
    timings = {
        **{k: round(v, 4) for k, v in alloc.timings.items()},
        "frontier_s": round(frontier_s, 4),
        "load_s": round(load_s, 4),
        "plots_s": round(plots_s, 4),
        "stage_s": round(time.perf_counter() - t_stage, 4),
    }
    return {
        "method": cfg.method,
        "budgets": cfg.budgets,
        "objective": sol.objective,
        "totals": sol.totals,
        "ops": len(report.ops),
        "timings": timings,
        "bits": str(out),
        "hessian": str(hessian_path),
        **extra,
    }


def _inputs(ctx: Context, cfg: AllocConfig) -> tuple[Path, object, nn.Module]:
    """``(hessian.json path, its report, the FP model)``, checked to name the same ops."""
    hessian_path = Path(cfg.hessian).expanduser() if cfg.hessian else ctx.path(HESSIAN)
    report = read_hessian(hessian_path)
    model = ctx.load_fp_model()
    names = list(quantizable_ops(model))
    if set(names) != set(report.ops):
        raise HawqError(
            f"{hessian_path} does not match the model's ops: only in the report "
            f"{choices(set(report.ops) - set(names)) or '-'}; only in the model "
            f"{choices(set(names) - set(report.ops)) or '-'}"
        )
    return hessian_path, report, model


def _known_sensitivities(ctx, cfg, report, model, base, fold_bn, hessian_path):
    """``(sens or None, extra metrics, (cache path, key) or None)``: measured sensitivities
    (``method=measured``) or a cache hit; None leaves them to :func:`allocate`."""
    start, extra = time.perf_counter(), {}
    if cfg.method == "measured":
        sens, fp_acc = _measured(ctx, cfg, report, model, base)
        extra["measured_fp_acc"] = fp_acc
        extra["measured_s"] = time.perf_counter() - start
        return sens, extra, None
    if cfg.cache and cfg.method.startswith("hawq"):
        key = _cache_key(ctx, cfg, base, fold_bn, hessian_path)
        cache_path = ctx.path("alloc_sens.json")
        sens = _cached_sens(cache_path, key, list(report.ops))
        extra["sensitivity_cache"] = "hit" if sens is not None else "miss"
        return sens, extra, (cache_path, key)
    return None, extra, None


def _write_sens_cache(cache: tuple, cfg: AllocConfig, alloc) -> None:
    path, key = cache
    prob = alloc.problem
    sens = {n: [float(v) for v in prob.sens[i]] for i, n in enumerate(prob.ops)}
    write_json(path, {"key": key, "method": cfg.method, "sens": sens})


def _frontier(cfg: AllocConfig, alloc) -> tuple[str, list, float]:
    """The exact ILP frontier over the first budget kind (others held): kind, points, secs."""
    kind = cfg.frontier_budget or next(iter(cfg.budgets), "bops")
    t0 = time.perf_counter()
    points = []
    if cfg.frontier_points:
        others = {k: v for k, v in cfg.budgets.items() if k != kind}
        points = frontier(alloc.problem, kind, cfg.frontier_points, others)
    return kind, points, time.perf_counter() - t0


def _plots(cfg: AllocConfig, alloc, report, kind: str, points: list, stem: Path) -> None:
    chosen = alloc.chosen
    low = _at_lowest_bits(alloc.problem, {n: c.kind for n, c in report.ops.items()})
    plot_allocation(
        {n: c.w_bits for n, c in chosen.items()},
        {n: c.a_bits for n, c in chosen.items()},
        low,
        alloc.op_sensitivity,
        path=f"{stem}_per_op.png",
        title=budget_title(cfg.method, cfg.budgets),
    )
    if points:
        best = (alloc.solution.totals[kind], alloc.solution.objective)
        plot_frontier(
            kind,
            [p.cost for p in points],
            [p.objective for p in points],
            best,
            path=f"{stem}_frontier.png",
            title=f"{cfg.method}: exact ILP frontier",
        )
