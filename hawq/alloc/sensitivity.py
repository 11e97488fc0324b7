"""Sensitivity of each op to each candidate setting: the objective of the allocation ILP.

With ``Q_b`` min/max fake quantization at ``b`` bits (:mod:`hawq.quant.primitives`),
``H_W`` the loss Hessian w.r.t. an op's parameters (``n_W`` elements) and ``H_a``
the per-sample loss Hessian w.r.t. an input operand ``a`` (``n_a`` elements):

* ``hawq_v2`` / ``hawq_v3`` (same second-order estimate; V3 is the name of the
  ILP recipe)::

      Omega_i(c) = Tr(H_W)/n_W * ||Q_w(W) - W||^2
                 + sum_a Tr(H_a)/n_a * E_x ||Q_a(a) - a||^2

  i.e. ``1/2 dW^T H dW`` with ``H`` replaced by its average eigenvalue (the factor
  1/2 is dropped: it does not change the argmin). ``E_x`` is the mean over
  calibration samples.
* ``hawq_v1``: the largest *algebraic* eigenvalue ``lambda_max/n_W`` in place of
  ``Tr(H_W)/n_W`` (``lambda_max`` bounds ``dW^T H dW / |dW|^2``; the largest-magnitude
  eigenvalue does not when it is negative. HAWQ-V1 only ranks ops by it;
  multiplying by the weight error turns the rank into a per-setting cost). The
  activation term is V2's (no activation eigenvalues).

``H_W`` is the op's *weight* block (``trace_numel`` elements; ``numel`` before v2,
whose traces also spanned the bias): the same elements ``||Q_w(W) - W||^2`` sums over.

Curvature rule (:func:`curvature`), for a trace ``t`` with standard error ``s``:

* sign determined, ``|t| >= 2 s``: ``t`` if positive; a *determined negative*
  curvature counts as 0 (a negative value would make the solver prefer
  quantization noise on that operand, which a second-order model cannot
  justify; a clamped op costs nothing to quantize, as a flat one would);
* sign undetermined, ``|t| < 2 s``: the upper 2-stderr bound ``t + 2 s`` (> 0): an
  op whose curvature the estimate could not resolve is not treated as flat;
* no standard error (eigenvalues, files without one): ``max(t, 0)``.

Ops whose value came from the second or third rule are logged.
* ``uniform``: ``4^-w + 4^-a`` for every op (quantization noise power of each
  operand; FP operands add 0): allocation driven by the costs alone.
* ``random``: ``r_i (4^-w + 4^-a)`` with ``r_i ~ U(0, 1)`` from a seed: a random order.
* ``measured``: ``acc(FP) - acc(only op i at c)``: one evaluation per op and setting
  (the seed study's single-op PTQ drop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from hawq.alloc.candidates import Candidate
from hawq.alloc.report import OPERANDS, OpCurvature
from hawq.errors import HawqError
from hawq.quant.plan import OpSetting, Plan

log = logging.getLogger("hawq")
METHODS = ("hawq_v1", "hawq_v2", "hawq_v3", "measured", "uniform", "random")
WLevel = tuple[int | None, str]  # (w_bits, w_format)
ALevel = tuple[int | None, str]  # (a_bits, a_format)


def _fake_quant(x: torch.Tensor, bits: int, fmt: str, symmetric: bool,
                granularity: str = "per_tensor", group_size: int = 128) -> torch.Tensor:
    """Min/max integer grid for ``fmt="int"``, else the float/block format (own scales)."""
    if fmt == "int":
        from hawq.quant.primitives import fake_quantize_tensor

        return fake_quantize_tensor(x, bits, symmetric=symmetric, granularity=granularity,
                                    group_size=group_size)  # fmt: skip
    from hawq.quant.formats import format_fake_quantize

    return format_fake_quantize(x, fmt, granularity=granularity, group_size=group_size)


def weight_errors(module: nn.Module | None, cands: Iterable[Candidate], base: OpSetting) -> dict:
    """``||Q_w(W) - W||^2`` per distinct (w_bits, w_format) of ``cands`` (FP: 0).

    ``Q_w`` uses ``base``'s granularity, group size and symmetry, channel axis 0;
    float formats use their own scales (:func:`hawq.quant.formats.format_fake_quantize`).
    """
    out: dict[WLevel, float] = {}
    for c in cands:
        level = (c.w_bits, c.w_format)
        if level in out:
            continue
        if c.w_bits is None or module is None:
            out[level] = 0.0
            continue
        w = module.weight.detach()
        q = _fake_quant(w, c.w_bits, c.w_format, base.symmetric, base.granularity,
                        base.group_size)  # fmt: skip
        out[level] = float((q.double() - w.double()).pow(2).sum())
    return out


def _operands(kind: str, inputs: tuple) -> dict[str, torch.Tensor]:
    return dict(zip(OPERANDS[kind], inputs[: len(OPERANDS[kind])], strict=True))


@torch.no_grad()
def activation_errors(
    model: nn.Module,
    batches: Iterable,
    op_cands: Mapping[str, tuple[str, list[Candidate]]],
    base: OpSetting,
    max_batches: int,
) -> dict[str, dict[str, dict[ALevel, float]]]:
    """``E_x ||Q_a(a) - a||^2`` per op, operand and activation level (per sample).

    Args:
        model: the FP model (eval mode is set here).
        batches: yields ``(x, y)``; the first ``max_batches`` are used.
        op_cands: op name -> (kind, candidates).
        base: ``a_symmetric`` picks the grid; ``dynamic=True`` takes each batch's
            min/max, else one static min/max over all batches (the ``minmax``
            calibrator) and a second pass measures the error.
        max_batches: calibration batches.
    """
    from hawq.quant.primitives import choose_qparams, fake_quantize, qrange

    modules = dict(model.named_modules())
    levels = {n: sorted({c.a_level for c in cs if c.a_bits is not None}, key=str)
              for n, (_, cs) in op_cands.items()}  # fmt: skip
    ranges: dict[tuple[str, str], list[float]] = {}
    sums: dict[str, dict[str, dict[ALevel, float]]] = {
        n: {k: {lv: 0.0 for lv in levels[n]} for k in OPERANDS[kind]}
        for n, (kind, _) in op_cands.items()
    }
    def observe(name: str, kind: str):
        def hook(_m, inputs, _out):
            for k, a in _operands(kind, inputs).items():
                r = ranges.setdefault((name, k), [np.inf, -np.inf])
                r[0], r[1] = min(r[0], float(a.min())), max(r[1], float(a.max()))
        return hook

    def measure(name: str, kind: str):
        def hook(_m, inputs, _out):
            for k, a in _operands(kind, inputs).items():
                for bits, fmt in levels[name]:
                    if base.dynamic or fmt != "int":
                        q = _fake_quant(a, bits, fmt, base.a_symmetric)
                    else:
                        lo, hi = (torch.tensor(v, dtype=a.dtype, device=a.device)
                                  for v in ranges[(name, k)])  # fmt: skip
                        s, z = choose_qparams(lo, hi, bits, base.a_symmetric)
                        q = fake_quantize(a, s, z, *qrange(bits, base.a_symmetric))
                    sums[name][k][(bits, fmt)] += float((q.double() - a.double()).pow(2).sum())
        return hook

    xs = [x for _, (x, *_rest) in zip(range(max_batches), batches, strict=False)]  # inputs only
    n_samples = sum(x.shape[0] for x in xs)
    if n_samples == 0:
        raise HawqError("no calibration batches for the activation errors")
    was_training = model.training
    model.eval()
    try:
        for make in [measure] if base.dynamic else [observe, measure]:
            handles = [modules[n].register_forward_hook(make(n, kind))
                       for n, (kind, _) in op_cands.items()]  # fmt: skip
            try:
                for x in xs:
                    model(x)
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(was_training)
    return {n: {k: {lv: v / n_samples for lv, v in d.items()} for k, d in ops.items()}
            for n, ops in sums.items()}  # fmt: skip


def curvature(mean: float, stderr: float | None, what: str = "") -> float:
    """The curvature allocation uses for an estimate ``mean +- stderr`` (module docstring):
    ``mean`` when its sign is determined positive, 0 when determined negative,
    ``mean + 2 stderr`` when undetermined, ``max(mean, 0)`` without a standard error."""
    if stderr is None or stderr != stderr:
        return max(mean, 0.0)
    if abs(mean) < 2 * stderr:
        log.info("alloc: %s: curvature sign undetermined (%.3g +- %.3g); using the upper "
                 "2-stderr bound %.3g", what, mean, stderr, mean + 2 * stderr)  # fmt: skip
        return mean + 2 * stderr
    if mean < 0:
        log.info("alloc: %s: negative curvature %.3g +- %.3g counts as 0", what, mean, stderr)
        return 0.0
    return mean


def hawq_sensitivity(
    curv: OpCurvature,
    cands: list[Candidate],
    w_err: Mapping[WLevel, float],
    a_err: Mapping[str, Mapping[ALevel, float]],
    method: str = "hawq_v3",
) -> np.ndarray:
    """``Omega_i(c)`` of the module docstring for each candidate of one op.

    Curvatures follow :func:`curvature` (the module docstring's rule: determined
    negative -> 0, undetermined sign -> the upper 2-stderr bound).
    """
    n_w = curv.numel if curv.trace_numel is None else curv.trace_numel
    if curv.kind == "matmul":
        w_curv = 0.0
    elif method == "hawq_v1":
        if curv.top_eig is None:
            raise HawqError(f"hawq_v1 needs eigenvalues of op {curv.name} in hessian.json")
        w_curv = max(curv.top_eig, 0.0) / max(n_w, 1)
    else:
        if curv.trace is None:
            raise HawqError(f"{method} needs the trace of op {curv.name} in hessian.json")
        w_curv = curvature(curv.trace, curv.trace_stderr, f"op {curv.name} weight") / max(n_w, 1)
    a_curv = {k: curvature(curv.act_trace[k], curv.act_trace_stderr.get(k),
                           f"op {curv.name} operand {k}") / max(curv.act_numel[k], 1)
              for k in OPERANDS[curv.kind]}  # fmt: skip
    out = np.zeros(len(cands))
    for j, c in enumerate(cands):
        if curv.kind != "matmul":
            out[j] += w_curv * w_err[(c.w_bits, c.w_format)]
        if c.a_bits is not None:
            for k in OPERANDS[curv.kind]:
                out[j] += a_curv[k] * a_err[k][c.a_level]
    return out


def noise_proxy(kind: str, c: Candidate) -> float:
    """``4^-w + 4^-a`` (matmul: ``2 * 4^-a``); a floating-point operand adds 0."""
    w, a = (c.a_bits, c.a_bits) if kind == "matmul" else (c.w_bits, c.a_bits)
    return sum(0.0 if b is None else 4.0**-b for b in (w, a))


def uniform_sensitivity(kinds: list[str], cands: list[list[Candidate]]) -> list[np.ndarray]:
    """Every op equally sensitive: :func:`noise_proxy` per candidate."""
    return [np.array([noise_proxy(k, c) for c in cs]) for k, cs in zip(kinds, cands, strict=True)]


def random_sensitivity(
    kinds: list[str], cands: list[list[Candidate]], seed: int
) -> list[np.ndarray]:
    """``r_i * noise_proxy`` with ``r_i ~ U(0, 1)`` drawn from ``seed``: a random op order."""
    r = np.random.default_rng(seed).random(len(kinds))
    return [r_i * p for r_i, p in zip(r, uniform_sensitivity(kinds, cands), strict=True)]


def measured_sensitivity(
    model: nn.Module,
    op_cands: Mapping[str, list[Candidate]],
    base: OpSetting,
    quantize_fn: Callable[[nn.Module, Plan], nn.Module],
    evaluate_fn: Callable[[nn.Module], float],
) -> tuple[float, dict[str, np.ndarray]]:
    """Single-op PTQ accuracy drop ``acc(FP) - acc(op i alone at c)`` per op and candidate.

    Args:
        model: the FP model; each evaluation quantizes a fresh deep copy.
        op_cands: op name -> candidates.
        base: the other fields of each op's setting.
        quantize_fn: ``(model copy, plan) -> quantized model`` (calibrating as needed).
        evaluate_fn: ``model -> accuracy``.

    Returns:
        ``(fp_accuracy, {op: drops})``.
    """
    import copy

    fp_acc = float(evaluate_fn(model))
    fp_default = OpSetting(**{**base.as_dict(), "w_bits": None, "a_bits": None})
    drops = {}
    for name, cands in op_cands.items():
        vals = []
        for c in cands:
            plan = Plan(fp_default, {name: c.to_setting(base)})
            vals.append(fp_acc - float(evaluate_fn(quantize_fn(copy.deepcopy(model), plan))))
        drops[name] = np.array(vals)
    return fp_acc, drops
