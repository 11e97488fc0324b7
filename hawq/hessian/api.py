"""Public entry points: per-op traces, top eigenvalues and activation traces of any model.

Op names are the module names of the model's quantizable ops
(:func:`hawq.models.ops.quantizable_ops`: every ``nn.Linear``, ``nn.Conv2d`` and
:class:`~hawq.models.ops.MatMul`). An op's block is its weight alone
(:func:`~hawq.hessian.operator.op_blocks`: its parameters named ``weight`` that
require grad), :math:`\\bar H_{ll} = \\nabla^2_{W_l} L`, the bias held fixed: quantization
perturbs the weight and the allocator multiplies by :math:`\\lVert\\Delta W_l\\rVert^2`.
Ops without such a weight (MatMul, a frozen weight) have no block and are absent
from the weight results (traces, eigenvalues); their operands still get
activation traces. Weight + bias blocks: :class:`HessianOperator` with
``blocks=op_blocks(model, include_bias=True)``. ``batches`` is any iterable of
``(x, y)`` (a one-shot generator is materialised); the Hessian is the
sample-weighted average over it (see :class:`HessianOperator`). Curvature is
taken in eval mode: a model in train mode is analysed under ``model.eval()``
(logged), its mode restored and its buffers untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from hawq.hessian.activation import ActivationHessian, operand_traces
from hawq.hessian.density import SpectralDensity, slq
from hawq.hessian.hutchinson import TraceEstimate, block_traces
from hawq.hessian.hvp import Batch, LossFn
from hawq.hessian.lanczos import lanczos
from hawq.hessian.operator import HessianOperator, hessian_operator
from hawq.hessian.power import EigenResult, power_iteration, warn_unconverged

EIG_METHODS = {"lanczos": lanczos, "power": power_iteration}


def layer_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rtol: float = 0.01,
    max_samples: int = 500,
    seed: int = 0,
    min_samples: int = 10,
    estimator: str = "sandwich",
    backend: str = "auto",
    callback: Callable[[int, float], None] | None = None,
    sketch: int = 40,
    chunk: int = 1,
) -> dict[str, TraceEstimate]:
    """:math:`\\mathrm{tr}(\\bar H_{ll})` of every weight op's own block (weight only), all ops
    from one full product per sample (:func:`~hawq.hessian.hutchinson.block_traces`).

    Args:
        model, loss_fn, batches: see the module docstring.
        rtol: target :math:`\\sqrt{\\sum_l s_l^2}/\\sum_l|\\hat t_l|` (cross-fitted stop:
            unbiased, :mod:`hawq.hessian.sampling`).
        max_samples / min_samples: bounds on Rademacher samples (after the sketch).
        seed: seeds the sketch and the probe vectors.
        estimator: ``sandwich`` (default), ``hutchpp`` or ``hutchinson``.
        backend: ``auto`` (``double_backward`` unless it fails; never timed),
            ``double_backward`` or ``func``.
        callback: ``callback(samples drawn, aggregate_rel_stderr)`` after every sample.
        sketch: sketch columns of ``sandwich`` / ``hutchpp`` (``2 * sketch`` products).
        chunk: probes per vmapped product (the stop rule is checked per chunk).

    Returns:
        op name -> :class:`TraceEstimate` (mean, stderr, n_samples, numel).
    """
    op, _ = hessian_operator(model, loss_fn, batches, backend=backend)
    res = block_traces(
        op,
        rtol=rtol,
        max_samples=max_samples,
        min_samples=min_samples,
        seed=seed,
        estimator=estimator,
        sketch=sketch,
        callback=callback,
        chunk=chunk,
    )
    return res.blocks


def layer_eigenpairs(
    op: HessianOperator,
    top_k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    method: str = "lanczos",
    which: str = "LA",
) -> dict[str, EigenResult]:
    """Top-``top_k`` eigenpairs of every diagonal block of ``op``, largest algebraic first
    (``which="LA"``: :math:`\\lambda_{\\max}`, the bound on
    :math:`\\Delta^\top H \\Delta / \\lVert\\Delta\rVert^2` HAWQ-V1 needs) or largest magnitude
    first (``"LM"``). Logs a warning for every op with an unconverged pair."""
    if method not in EIG_METHODS:
        raise ValueError(f"unknown eigen method {method!r}; allowed: {', '.join(EIG_METHODS)}")
    solve = EIG_METHODS[method]
    out = {}
    for name in op.blocks:
        out[name] = solve(
            op.block(name), top_k=top_k, tol=tol, max_iter=max_iter, seed=seed, which=which
        )
        warn_unconverged(name, out[name], tol)
    return out


def layer_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    top_k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    method: str = "lanczos",
    backend: str = "double_backward",
    which: str = "LA",
) -> dict[str, list[float]]:
    """Top-``top_k`` eigenvalues (with multiplicity) of every weight op's block.

    Args:
        model, loss_fn, batches: see the module docstring.
        top_k: eigenvalues per op.
        tol: relative residual :math:`\\lVert Hv - \\lambda v\\rVert/|\\lambda|` to stop at.
        max_iter: products per op (Lanczos) or per eigenpair (power iteration).
        seed: seeds the start vectors.
        method: ``lanczos`` (block Lanczos) or ``power`` (power iteration with deflation).
        backend: ``double_backward``, ``func`` or ``auto``.
        which: ``LA`` (default: largest algebraic first, :math:`\\lambda_{\\max}` first) or
            ``LM`` (largest magnitude first).

    Returns:
        op name -> eigenvalues. :func:`layer_eigenpairs` also gives vectors,
        residuals and iteration counts.
    """
    op, _ = hessian_operator(model, loss_fn, batches, backend=backend)
    pairs = layer_eigenpairs(op, top_k, tol, max_iter, seed, method, which)
    return {name: r.values for name, r in pairs.items()}


def activation_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    rtol: float = 0.05,
    max_samples: int = 500,
    seed: int = 0,
    min_samples: int = 10,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, dict[str, TraceEstimate]]:
    """Per-sample Hessian trace w.r.t. every op's input operand(s).

    Returns:
        op name -> operand (``x`` for Linear/Conv2d, ``a`` and ``b`` for MatMul)
        -> :class:`TraceEstimate` whose ``numel`` is the operand's elements per sample.
    """
    act = ActivationHessian(model, loss_fn, batches)
    return operand_traces(
        act,
        rtol=rtol,
        max_samples=max_samples,
        min_samples=min_samples,
        seed=seed,
        callback=callback,
    )


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    n_vectors: int = 1,
    steps: int = 80,
    seed: int = 0,
    per_layer: bool = False,
) -> dict[str, SpectralDensity]:
    """SLQ density of the Hessian over all op weights (key ``""``) and, optionally, per op."""
    op = HessianOperator(model, loss_fn, batches)
    out = {"": slq(op, n_vectors, steps, seed)}
    if per_layer:
        for name in op.blocks:
            out[name] = slq(op.block(name), n_vectors, steps, seed)
    return out
