"""Stage ``hessian``: per-op curvature of the FP checkpoint -> ``hessian.json`` + plots.

From ``hessian.batches`` batches of ``hessian.batch_size`` images of the
``hessian.split`` split (eval mode, cross-entropy): per-op Hessian traces
of each op's weight (sandwich / Hutch++ / Hutchinson, all ops from one product
per sample, stopped on the aggregate relative standard error, cross-fitted so that the
stop does not bias them: :mod:`hawq.hessian.sampling`), the top
eigenvalues of each op's weight block with multiplicity, largest algebraic
first by default (block Lanczos or power iteration; unconverged pairs are
flagged and logged), per-sample activation
traces of every op operand, and the SLQ spectral density. ``hessian.backend=auto`` is
``double_backward`` unless a trial double-backward product fails, then ``func`` (never timed: a
rerun gives the same ``hessian.json``; ``backend_choice`` records why). Writes
``hessian.json`` (schema in :mod:`hawq.hessian.report`), ``hessian_*.png`` bar
charts and ``hessian_density.png``. Runs alone from ``paths.checkpoint``. Under
``torchrun`` batches are sharded over ranks and rank 0 writes.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.distributed import destroy_process_group
from tqdm import tqdm

from hawq.batches import cast_floats
from hawq.distributed import init_from_env
from hawq.engine import StepTimer
from hawq.errors import HawqError
from hawq.hessian import dist
from hawq.hessian.activation import ActivationHessian, operand_traces
from hawq.hessian.api import layer_eigenpairs
from hawq.hessian.config import HessianConfig
from hawq.hessian.density import slq
from hawq.hessian.fisher import operand_fisher, weight_fisher
from hawq.hessian.hutchinson import block_traces
from hawq.hessian.operator import hessian_operator
from hawq.hessian.report import (
    _finite_or_none,
    curvature_report,
    write_hessian_report,
)
from hawq.models.ops import op_inventory
from hawq.stages.context import Context
from hawq.stages.contract import HESSIAN, Contract, checkpoint
from hawq.viz.hessian import plot_density, plot_report

log = logging.getLogger("hawq")
REPORT = HESSIAN


def _progress(desc: str, total: int):
    """A tqdm bar (on a TTY) and, without one, a log line a minute with elapsed time and the
    ETA of ``total`` samples (an upper bound: ``rtol`` may stop it early)."""
    bar = tqdm(total=total, desc=desc, leave=False, disable=None if dist.is_main() else True)
    timer = StepTimer(total, f"hessian: {desc} (samples; stops early at rtol)")

    def update(n: int, worst: float) -> None:
        bar.update(n - bar.n)
        bar.set_postfix(rel_err=f"{worst:.3f}")
        if dist.is_main() and n >= 1:
            timer.tick(n - 1, f", rel. error {worst:.3f}")

    return bar, update


CONTRACT = Contract(("data", "hessian"), (checkpoint,))


def run(ctx: Context) -> dict:
    created, ctx.device = init_from_env(ctx.device)  # under torchrun: one rank per process
    try:
        return _run(ctx)
    finally:
        if created:
            destroy_process_group()


def _run(ctx: Context) -> dict:
    hc = ctx.group("hessian")
    model, inventory, batches = _inputs(ctx, hc)
    loss_fn = ctx.loss_fn()
    if hc.method == "fisher":
        return _run_fisher(ctx, hc, model, loss_fn, batches, inventory)
    start = time.perf_counter()
    op, why = hessian_operator(model, loss_fn, batches, backend=hc.backend)
    log.info(
        "hessian: backend %s (%s) over %d parameters in %d ops",
        op.backend,
        why,
        op.size,
        len(op.blocks),
    )
    traces, t_traces = _traces(op, hc), time.perf_counter() - start
    eigs, densities = _spectrum(op, hc)
    op.release()
    acts = _activation_traces(model, loss_fn, batches, hc) if hc.activation else {}
    wall = time.perf_counter() - start
    report = curvature_report(
        inventory,
        traces.blocks,
        acts,
        eigs,
        trace_numel=op.numel,
        **_run_meta(ctx, hc, wall),
        estimator=hc.estimator,
        method="hessian",
        backend=op.backend,
        eig_which=hc.eig_which,
        sketch=traces.sketch,
        trace_rel_stderr=_finite_or_none(traces.rel_stderr),
        backend_requested=hc.backend,
        backend_choice=why,  # auto: decided by trying double backward, never by timing
        hvp_products=op.n_hvp,
        whole_trace={"mean": traces.total.mean, "stderr": traces.total.stderr},
    )
    _write(ctx, report, densities)
    return _summary(ctx, op, traces, t_traces)


def _inputs(ctx: Context, hc: HessianConfig) -> tuple[nn.Module, dict, list]:
    """The FP model in the configured dtype, its op inventory and the fixed batches."""
    dtype = torch.float64 if hc.dtype == "float64" else torch.float32
    model = ctx.load_fp_model()
    inventory = op_inventory(model, ctx.data.input_size)  # before any dtype change
    model = model.to(dtype).eval()
    loader = ctx.data.eval_loader(hc.split, ctx.device, hc.batch_size)
    if hc.batches > len(loader):
        raise HawqError(
            f"hessian.batches={hc.batches} but the {hc.split} split has only "
            f"{len(loader)} batches of {hc.batch_size}"
        )
    batches = [(cast_floats(x, dtype), y) for _, (x, y) in zip(range(hc.batches), loader)]
    return model, inventory, batches


def _traces(op, hc: HessianConfig):
    bar, update = _progress("hessian traces", hc.max_samples)
    traces = block_traces(
        op,
        rtol=hc.rtol,
        max_samples=hc.max_samples,
        min_samples=hc.min_samples,
        seed=hc.seed,
        estimator=hc.estimator,
        sketch=hc.sketch,
        callback=update,
        chunk=hc.chunk,
    )
    bar.close()
    return traces


def _spectrum(op, hc: HessianConfig) -> tuple[dict, dict]:
    """Per-op top eigenpairs and the spectral densities the config asks for."""
    eigs = {}
    if hc.top_k:
        eigs = layer_eigenpairs(
            op, hc.top_k, hc.tol, hc.max_iter, hc.seed, hc.eig_method, hc.eig_which
        )
    densities = {}
    if hc.density:
        densities[""] = slq(op, hc.density_vectors, hc.density_steps, hc.seed)
        if hc.density_per_layer:
            for name in op.blocks:
                densities[name] = slq(op.block(name), hc.density_vectors, hc.density_steps, hc.seed)
    return eigs, densities


def _activation_traces(model: nn.Module, loss_fn, batches: list, hc: HessianConfig) -> dict:
    bar, update = _progress("activation traces", hc.max_samples)
    acts = operand_traces(
        ActivationHessian(model, loss_fn, batches),
        rtol=hc.rtol,
        max_samples=hc.max_samples,
        min_samples=hc.min_samples,
        seed=hc.seed,
        callback=update,
    )
    bar.close()
    return acts


def _summary(ctx: Context, op, traces, t_traces: float) -> dict:
    rel = [e.rel_stderr for e in traces.blocks.values()]
    undetermined = [k for k, e in traces.blocks.items() if e.sign_undetermined]
    if undetermined:
        log.warning(
            "hessian: trace sign undetermined (|trace| < 2 stderr) for %d op(s): %s",
            len(undetermined),
            ", ".join(undetermined),
        )
    return {
        "report": str(ctx.path(REPORT)),
        "backend": op.backend,
        "trace_samples": traces.total.n_samples,
        "worst_rel_stderr": _finite_or_none(max(rel)) if rel else None,
        "trace_rel_stderr": _finite_or_none(traces.rel_stderr),
        "trace_undetermined": len(undetermined),
        "whole_trace": traces.total.mean,
        "hvp_products": op.n_hvp,
        "traces_s": round(t_traces, 3),
    }


def _run_fisher(
    ctx: Context,
    hc: HessianConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    batches: list,
    inventory: list,
) -> dict:
    """``hessian.method=fisher``: empirical Fisher traces (:mod:`hawq.hessian.fisher`) in
    the same ``hessian.json`` shape: ``trace`` / ``act_trace`` per op, no eigenvalues."""
    start = time.perf_counter()
    weights = weight_fisher(model, loss_fn, batches)
    t_traces = time.perf_counter() - start
    acts = operand_fisher(model, loss_fn, batches) if hc.activation else {}
    wall = time.perf_counter() - start
    samples = sum(len(y) for _, y in batches)
    log.info(
        "hessian: empirical Fisher traces of %d weights and %d ops' operands from %d "
        "samples in %.1f s (no Hessian-vector products)",
        len(weights),
        len(acts),
        samples,
        wall,
    )
    total = sum(e.mean for e in weights.values())
    # as if the ops' estimates were independent (they share samples): an indicative spread
    total_se = sum(e.stderr**2 for e in weights.values()) ** 0.5
    report = curvature_report(
        inventory,
        weights,
        acts,
        **_run_meta(ctx, hc, wall),
        estimator="fisher",
        method="fisher",
        backend="per_sample_grad",
        hvp_products=0,
        whole_trace={"mean": total, "stderr": total_se},
    )
    _write(ctx, report)
    return {
        "report": str(ctx.path(REPORT)),
        "method": "fisher",
        "backend": "per_sample_grad",
        "trace_samples": samples,
        "whole_trace": total,
        "hvp_products": 0,
        "traces_s": round(t_traces, 3),
    }


def _run_meta(ctx: Context, hc: HessianConfig, wall: float) -> dict:
    """What ``hessian.json`` records of the run, whichever method made it."""
    return {
        "model": ctx.cfg.model.get("_target_"),
        "checkpoint": str(ctx.checkpoint),
        "seed": hc.seed,
        "dtype": hc.dtype,
        "batches": hc.batches,
        "batch_size": hc.batch_size,
        "split": hc.split,
        "wall_s": round(wall, 3),
        "world_size": dist.world()[1],
    }


def _write(ctx: Context, report: dict, densities: dict | None = None) -> None:
    """``hessian.json`` and its plots (rank 0 only)."""
    if not dist.is_main():
        return
    write_hessian_report(ctx.path(REPORT), report)
    plots = plot_report(report, ctx.run_dir)
    if densities:
        plots.append(plot_density(densities, ctx.path("hessian_density.png")))
    log.info("hessian: wrote %s and %d plots", ctx.path(REPORT), len(plots))
