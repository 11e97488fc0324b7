"""Stage ``int4_curve``: accuracy vs INT4 share, enabling INT4 op by op in several orders.

Inputs: the FP checkpoint, ``hessian.json`` (for the ``hessian`` order) and the data.
For each order of ``curve.orders`` (:mod:`hawq.alloc.curve`: Hessian sensitivity,
measured single-op PTQ drop on ``curve.order_split``, ``curve.random_orders`` seeded
random permutations) the first ``p`` ops run at W4A4 and the rest at ``curve.rest``
(W8A8, or FP), all other fields from ``quant.default``; each prefix is quantized with
``quantize_``, calibrated on one fixed calibration set and evaluated on ``curve.split``
at ``curve.batch_size`` (the seed study: 100; dynamic ranges depend on the batch). The
cost to rank is recorded per order (``ranking``: evaluations, seconds, and the hessian
stage's wall time from the ``results.json`` beside ``hessian.json``); the random orders
become a mean +- std band (``random_band``); ``curve.all_int2`` adds all-W2A2 PTQ and
``curve.int2_orders`` one INT2 plan per pick.
Outputs ``int4_curve.json`` (per order: op sequence, prefixes, INT4 shares
of MACs and of ops, accuracies, FP accuracy, the largest share within each threshold;
the per-op sensitivities and their Spearman correlation), ``int4_curve.png`` (two
panels: INT4 share of ops and of MACs, the random band shaded) and,
with ``curve.int2_plan_k=k``, ``int2_k<k>_bits.yaml``: the ``k`` least sensitive ops
of ``curve.int2_order`` at W2A2, the rest FP (its PTQ accuracy is recorded too).
Skipping a finished run is the pipeline's, as for every stage (its completion record:
``hawq/stages/record.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any

from hawq.alloc.curve import (
    LOW,
    CurveConfig,
    PrefixEvaluator,
    ascending,
    band,
    hessian_sensitivity,
    int2_plan,
    order_entry,
    prefixes,
    random_order,
    spearman,
)
from hawq.alloc.report import read_hessian
from hawq.engine import evaluate
from hawq.errors import HawqError, choices
from hawq.io import read_json, write_json
from hawq.models.ops import op_inventory
from hawq.quant.config import QuantConfig, default_setting
from hawq.quant.plan import OpSetting, Plan, save_plan
from hawq.stages.context import Context
from hawq.stages.contract import HESSIAN, Contract, checkpoint, configured
from hawq.viz.curve import plot_int4_share_curves

log = logging.getLogger("hawq")


def _config(ctx: Context) -> CurveConfig:
    return ctx.group("curve")


def _base(ctx: Context) -> OpSetting:
    quant = ctx.cfg.get("quant")
    return default_setting(quant.default if quant else None)


def _key(cfg: CurveConfig, base: OpSetting) -> dict[str, Any]:
    """What the outputs depend on besides the checkpoint and data: compared by :func:`done`."""
    return {"curve": dataclasses.asdict(cfg), "quant_default": base.as_dict()}


def _quant(ctx: Context) -> QuantConfig:
    return ctx.group("quant")


def _hessian_stage_seconds(hessian_path: Path) -> float | None:
    """The ``hessian`` stage's wall time from the ``results.json`` beside ``hessian.json``."""
    res = hessian_path.parent / "results.json"
    if not res.is_file():
        return None
    stage = read_json(res).get("stages", {}).get("hessian", {})
    return stage.get("wall_s")


def _loader(ctx: Context, split: str, batch_size: int | None, subset: int | None):
    loader = ctx.data.eval_loader(split, ctx.device, batch_size)
    if subset is None:
        return loader
    n = -(-subset // loader.batch_size)
    return list(islice(loader, n))  # the first ~subset images (whole batches)


CONTRACT = Contract(
    ("seed", "data", "quant", "curve"), (checkpoint, configured("curve.hessian", HESSIAN))
)


def run(ctx: Context) -> dict[str, Any]:
    cfg = _config(ctx)
    base = _base(ctx)
    qc = _quant(ctx)
    start = time.perf_counter()
    model = ctx.load_fp_model()
    macs = {o.name: o.macs for o in op_inventory(model, tuple(ctx.data.input_size))}
    ops = list(macs)
    if cfg.int2_plan_k is not None and cfg.int2_plan_k > len(ops):
        int2_plan(ops, cfg.int2_plan_k, base)  # raises before any evaluation
    calib_loader = ctx.data.eval_loader(
        "train", ctx.device, cfg.calib_batch_size or qc.calib_batch_size
    )
    calib = list(islice(calib_loader, cfg.calib_batches or qc.calib_batches))
    ev, order_ev, rank_images = _evaluators(ctx, cfg, qc, model, ops, base, calib)
    fp_acc = float(ev.evaluate_fn(model))
    timings: dict[str, float] = {}
    sens, sequences, ranking, hessian_path = _rank(
        ctx, cfg, model, ops, calib, base, order_ev, rank_images, timings
    )
    entries, random_band = _curves(cfg, ev, ops, sequences, macs, fp_acc, timings)
    rho = (
        spearman([sens["hessian"][n] for n in ops], [sens["measured"][n] for n in ops])
        if {"hessian", "measured"} <= set(sens)
        else None
    )
    int2, int2_by = _int2_plans(ctx, cfg, ev, sequences, base, fp_acc)
    all_int2 = None
    if cfg.all_int2:
        w2 = dataclasses.replace(base, w_bits=2, a_bits=2)
        all_int2 = ev.ptq_accuracy(Plan(w2, {}))
    first = next(iter(entries.values()))
    n_test_evals = len(ev.cache) + 1 + len(int2_by) + (all_int2 is not None)  # + FP
    result = {
        "schema": 2,
        "key": _key(cfg, base),
        "ops": ops,
        "macs": macs,
        "low": LOW.key,
        "rest": cfg.rest,
        "fp_acc": fp_acc,
        "high_acc": first["accuracies"][0],
        "int4_acc": first["accuracies"][-1],
        "all_int2_acc": all_int2,
        "thresholds": list(cfg.thresholds),
        "hessian": None if hessian_path is None else str(hessian_path),
        "sensitivity": sens,
        "spearman": rho,
        "orders": entries,
        "random_band": random_band,
        "ranking": ranking,  # cost to rank: evaluations and seconds per order
        "int2": int2,
        "int2_by_order": int2_by,
        "evaluations": n_test_evals + (0 if order_ev is ev else len(order_ev.cache)),
    }
    out = ctx.path(cfg.out)
    png = out.with_suffix(".png")
    plot_int4_share_curves(
        entries,
        random_band,
        fp_acc,
        cfg.thresholds,
        path=png,
        title=f"W4A4 op by op, rest {cfg.rest} ({len(ops)} ops)",
    )
    write_json(out, result)  # last: the JSON exists only when everything succeeded
    return _summary(result, timings, out, png, time.perf_counter() - start)


def _evaluators(ctx: Context, cfg: CurveConfig, qc: QuantConfig, model, ops, base, calib):
    """``(curve evaluator, ranking evaluator, images the ranking scores on)``: the ranking
    one scores on ``curve.order_split`` (a held-out split) when it differs from the curve's."""
    test = ctx.data.eval_loader(cfg.split, ctx.device, cfg.batch_size)

    def evaluate_fn(m) -> float:
        return evaluate(m, test, ctx.device, desc="int4_curve")["acc"]

    high, low = cfg.high.to_setting(base), LOW.to_setting(base)
    ev = PrefixEvaluator(model, ops, low, high, calib, evaluate_fn, qc.fold_bn)
    if "measured" not in cfg.orders or (cfg.order_split == cfg.split and not cfg.order_subset):
        return ev, ev, test
    held = _loader(ctx, cfg.order_split, cfg.batch_size, cfg.order_subset)

    def order_fn(m) -> float:
        return evaluate(m, held, ctx.device, desc=f"rank on {cfg.order_split}")["acc"]

    return ev, PrefixEvaluator(model, ops, low, high, calib, order_fn, qc.fold_bn), held


def _rank(ctx, cfg: CurveConfig, model, ops, calib, base, order_ev, rank_images, timings):
    """Per-op sensitivities and op sequences of every order of ``curve.orders``, with the
    cost to rank each (evaluations, seconds)."""
    sens: dict[str, dict[str, float]] = {}
    sequences: dict[str, list[str]] = {}
    ranking: dict[str, dict[str, Any]] = {}
    hessian_path = None
    for name in cfg.orders:
        t0 = time.perf_counter()
        if name == "hessian":
            hessian_path = Path(cfg.hessian).expanduser() if cfg.hessian else ctx.path(HESSIAN)
            report = read_hessian(hessian_path)
            if set(report.ops) != set(ops):
                raise HawqError(
                    f"{hessian_path} does not match the model's ops: only in the "
                    f"report {choices(set(report.ops) - set(ops)) or '-'}; only in "
                    f"the model {choices(set(ops) - set(report.ops)) or '-'}"
                )
            delta = hessian_sensitivity(report, model, calib, base, cfg.high, LOW, cfg.method)
            sens["hessian"] = {n: delta[n] for n in ops}
            ranking["hessian"] = {
                "evaluations": 0,
                "seconds": time.perf_counter() - t0,
                "hessian_stage_s": _hessian_stage_seconds(hessian_path),
            }
        elif name == "measured":
            n_before = len(order_ev.cache)
            _, drops = order_ev.single_op_drops()
            sens["measured"] = drops
            ranking["measured"] = {
                "evaluations": len(order_ev.cache) - n_before,
                "seconds": time.perf_counter() - t0,
                "split": cfg.order_split,
                "images": sum(int(y.shape[0]) for _, y in rank_images),
            }
        sequences[name] = random_order(ops, cfg.seed) if name == "random" else ascending(sens[name])
        timings[f"{name}_order_s"] = time.perf_counter() - t0
    return sens, sequences, ranking, hessian_path


def _curves(cfg: CurveConfig, ev, ops, sequences, macs, fp_acc, timings):
    """The accuracy-vs-INT4-share curve of each order, and the random orders' band."""
    points = prefixes(len(ops), cfg.step)
    rpoints = prefixes(len(ops), cfg.random_step or cfg.step)
    entries = {}
    for name, seq in sequences.items():
        t0 = time.perf_counter()
        pts = rpoints if name == "random" else points
        accs = ev.curve(seq, pts)
        entries[name] = order_entry(seq, pts, accs, macs, fp_acc, cfg.thresholds)
        timings[f"{name}_curve_s"] = time.perf_counter() - t0
        log.info("int4_curve: %s order: %s", name, entries[name]["max_share_within"])
    if "random" not in sequences:
        return entries, None
    t0 = time.perf_counter()
    extra = [random_order(ops, cfg.seed + r) for r in range(1, cfg.random_orders)]
    runs = [entries["random"]] + [
        order_entry(seq, rpoints, ev.curve(seq, rpoints), macs, fp_acc, cfg.thresholds)
        for seq in extra
    ]
    random_band = {
        **band(runs, cfg.thresholds),
        "seeds": [cfg.seed + r for r in range(cfg.random_orders)],
        "runs": runs,
    }
    timings["random_band_s"] = time.perf_counter() - t0
    return entries, random_band


def _int2_plans(ctx: Context, cfg: CurveConfig, ev, sequences, base, fp_acc):
    """With ``curve.int2_plan_k=k``: per pick, the ``k`` least sensitive ops at W2A2 (the
    rest FP) as a plan file, with its PTQ accuracy."""
    int2, int2_by = None, {}
    if cfg.int2_plan_k is None:
        return int2, int2_by
    k = cfg.int2_plan_k
    for i, pick in enumerate(cfg.int2_picks):
        plan = int2_plan(sequences[pick], k, base)
        path = ctx.path(f"int2_k{k}_bits.yaml" if i == 0 else f"int2_k{k}_{pick}_bits.yaml")
        acc = ev.ptq_accuracy(plan)
        rec = {"k": k, "order": pick, "ops": list(plan.ops), "acc": acc, "plan": str(path)}
        meta = {"source": "int4_curve", "ptq_acc": acc, "fp_acc": fp_acc}
        save_plan(path, plan, {**meta, **{key: rec[key] for key in ("k", "order", "ops")}})
        int2_by[pick] = rec
        int2 = int2 or rec
    return int2, int2_by


def _summary(result: dict, timings: dict, out: Path, png: Path, total_s: float) -> dict:
    """The stage's metrics (``results.json``) from its full result."""
    entries, random_band, int2 = result["orders"], result["random_band"], result["int2"]
    return {
        "fp_acc": result["fp_acc"],
        "high_acc": result["high_acc"],
        "int4_acc": result["int4_acc"],
        "all_int2_acc": result["all_int2_acc"],
        "max_share_within": {n: e["max_share_within"] for n, e in entries.items()},
        "max_op_share_within": {n: e["max_op_share_within"] for n, e in entries.items()},
        "random_band": None
        if random_band is None
        else {k: random_band[k] for k in ("n", "seeds", "max_share_within", "max_op_share_within")},
        "ranking": {
            n: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            for n, r in result["ranking"].items()
        },
        "spearman": result["spearman"],
        "int2": None if int2 is None else {k: int2[k] for k in ("k", "order", "acc", "plan")},
        "int2_by_order": {
            n: {k: r[k] for k in ("k", "acc", "ops")} for n, r in result["int2_by_order"].items()
        },
        "evaluations": result["evaluations"],
        "ops": len(result["ops"]),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "curve": str(out),
        "plot": str(png),
        "total_s": round(total_s, 3),
    }
