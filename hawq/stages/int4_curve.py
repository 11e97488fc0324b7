"""Stage ``int4_curve``: accuracy vs INT4 share, enabling INT4 op by op in several orders.

Inputs: the FP checkpoint, ``hessian.json`` (for the ``hessian`` order) and the data.
For each order of ``curve.orders`` (:mod:`hawq.alloc.curve`: Hessian sensitivity,
measured single-op PTQ drop, seeded random) the first ``p`` ops run at W4A4 and the
rest at ``curve.rest`` (W8A8, or FP), all other fields from ``quant.default``; each
prefix is quantized with ``quantize_``, calibrated on one fixed calibration set and
evaluated. Outputs ``int4_curve.json`` (per order: op sequence, prefixes, INT4 shares
of MACs and of ops, accuracies, FP accuracy, the largest share within each threshold;
the per-op sensitivities and their Spearman correlation), ``int4_curve.png`` and,
with ``curve.int2_plan_k=k``, ``int2_k<k>_bits.yaml``: the ``k`` least sensitive ops
of ``curve.int2_order`` at W2A2, the rest FP (its PTQ accuracy is recorded too).
Skipped when the JSON exists and was made with the same ``curve`` config and
``quant.default``.
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
    hessian_sensitivity,
    int2_plan,
    order_entry,
    prefixes,
    random_order,
    spearman,
)
from hawq.alloc.report import read_hessian
from hawq.config import typed
from hawq.engine import evaluate
from hawq.errors import HawqError, choices
from hawq.io import write_json
from hawq.models.ops import op_inventory
from hawq.quant.config import QuantConfig, default_setting
from hawq.quant.plan import OpSetting, save_plan
from hawq.stages import record
from hawq.stages.context import Context
from hawq.viz.curve import plot_int4_curve

log = logging.getLogger("hawq")


def _config(ctx: Context) -> CurveConfig:
    return typed(ctx.cfg.get("curve"), CurveConfig, "curve")


def _base(ctx: Context) -> OpSetting:
    quant = ctx.cfg.get("quant")
    return default_setting(quant.default if quant else None)


def _key(cfg: CurveConfig, base: OpSetting) -> dict[str, Any]:
    """What the outputs depend on besides the checkpoint and data: compared by :func:`done`."""
    return {"curve": dataclasses.asdict(cfg), "quant_default": base.as_dict()}


def done(ctx: Context) -> bool:
    """Its completion record matches (:mod:`hawq.stages.record`)."""
    return record.done(ctx, "int4_curve")


def _quant(ctx: Context) -> QuantConfig:
    return typed(ctx.cfg.get("quant"), QuantConfig, "quant")


def run(ctx: Context) -> dict[str, Any]:
    cfg = _config(ctx)
    base = _base(ctx)
    qc = _quant(ctx)
    start = time.perf_counter()
    model = ctx.load_fp_model()
    input_size = tuple(ctx.data.input_size)
    macs = {o.name: o.macs for o in op_inventory(model, input_size)}
    ops = list(macs)
    if cfg.int2_plan_k is not None and cfg.int2_plan_k > len(ops):
        int2_plan(ops, cfg.int2_plan_k, base)  # raises before any evaluation
    calib_loader = ctx.data.eval_loader("train", ctx.device,
                                        cfg.calib_batch_size or qc.calib_batch_size)  # fmt: skip
    calib = list(islice(calib_loader, cfg.calib_batches or qc.calib_batches))
    test = ctx.data.eval_loader(cfg.split, ctx.device, cfg.batch_size)

    def evaluate_fn(m) -> float:
        return evaluate(m, test, ctx.device, desc="int4_curve")["acc"]

    high = cfg.high.to_setting(base)
    ev = PrefixEvaluator(model, ops, LOW.to_setting(base), high, calib, evaluate_fn, qc.fold_bn)
    fp_acc = float(evaluate_fn(model))
    sens: dict[str, dict[str, float]] = {}
    sequences: dict[str, list[str]] = {}
    hessian_path = None
    timings: dict[str, float] = {}
    for name in cfg.orders:
        t0 = time.perf_counter()
        if name == "hessian":
            hessian_path = (Path(cfg.hessian).expanduser() if cfg.hessian
                            else ctx.path("hessian.json"))  # fmt: skip
            report = read_hessian(hessian_path)
            if set(report.ops) != set(ops):
                raise HawqError(f"{hessian_path} does not match the model's ops: only in the "
                                f"report {choices(set(report.ops) - set(ops)) or '-'}; only in "
                                f"the model {choices(set(ops) - set(report.ops)) or '-'}")
            delta = hessian_sensitivity(report, model, calib, base, cfg.high, LOW, cfg.method)
            sens["hessian"] = {n: delta[n] for n in ops}
        elif name == "measured":
            _, drops = ev.single_op_drops()
            sens["measured"] = drops
        if name == "random":
            sequences[name] = random_order(ops, cfg.seed)
        else:
            sequences[name] = ascending(sens[name])
        timings[f"{name}_order_s"] = time.perf_counter() - t0
    points = prefixes(len(ops), cfg.step)
    entries = {}
    for name, seq in sequences.items():
        t0 = time.perf_counter()
        accs = ev.curve(seq, points)
        entries[name] = order_entry(seq, points, accs, macs, fp_acc, cfg.thresholds)
        timings[f"{name}_curve_s"] = time.perf_counter() - t0
        log.info("int4_curve: %s order: %s", name, entries[name]["max_share_within"])
    rho = (spearman([sens["hessian"][n] for n in ops], [sens["measured"][n] for n in ops])
           if {"hessian", "measured"} <= set(sens) else None)  # fmt: skip
    out = ctx.path(cfg.out)
    int2 = None
    if cfg.int2_plan_k is not None:
        k = cfg.int2_plan_k
        plan = int2_plan(sequences[cfg.int2_order], k, base)
        int2_path = ctx.path(f"int2_k{k}_bits.yaml")
        int2 = {"k": k, "order": cfg.int2_order, "ops": list(plan.ops),
                "acc": ev.ptq_accuracy(plan), "plan": str(int2_path)}  # fmt: skip
        save_plan(int2_path, plan, {"source": "int4_curve", "k": k, "order": cfg.int2_order,
                                    "ops": list(plan.ops), "ptq_acc": int2["acc"],
                                    "fp_acc": fp_acc})  # fmt: skip
    first = next(iter(entries.values()))
    result = {
        "schema": 1,
        "key": _key(cfg, base),
        "ops": ops,
        "macs": macs,
        "low": LOW.key,
        "rest": cfg.rest,
        "fp_acc": fp_acc,
        "high_acc": first["accuracies"][0],
        "int4_acc": first["accuracies"][-1],
        "thresholds": list(cfg.thresholds),
        "hessian": None if hessian_path is None else str(hessian_path),
        "sensitivity": sens,
        "spearman": rho,
        "orders": entries,
        "int2": int2,
        "evaluations": len(ev.cache) + 1 + (int2 is not None),  # + FP (+ the INT2 plan)
    }
    png = out.with_suffix(".png")
    plot_int4_curve({n: (e["shares"], e["accuracies"]) for n, e in entries.items()}, fp_acc,
                    cfg.thresholds, path=png,
                    title=f"W4A4 op by op, rest {cfg.rest} ({len(ops)} ops)")  # fmt: skip
    write_json(out, result)  # last: done() sees the JSON only when everything succeeded
    return {
        "fp_acc": fp_acc,
        "high_acc": result["high_acc"],
        "int4_acc": result["int4_acc"],
        "max_share_within": {n: e["max_share_within"] for n, e in entries.items()},
        "max_op_share_within": {n: e["max_op_share_within"] for n, e in entries.items()},
        "spearman": rho,
        "int2": None if int2 is None else {k: int2[k] for k in ("k", "order", "acc", "plan")},
        "evaluations": result["evaluations"],
        "ops": len(ops),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "curve": str(out),
        "plot": str(png),
        "total_s": round(time.perf_counter() - start, 3),
    }
