"""Sensitivity of each op to each candidate setting: the objective of the allocation ILP.

With ``Q`` the deployed quantizer of the candidate's setting (:mod:`hawq.alloc.quant_error`:
the plan's calibrator, MSE clipping, unsigned grid for non-negative inputs, folded BN),
``H_W`` the loss Hessian w.r.t. an op's parameters (``n_W`` elements) and ``H_a`` the
per-sample loss Hessian w.r.t. an input operand ``a`` (``n_a`` elements):

* ``hawq_v3``: **HAWQ-V3 exactly** (Yao et al., ICML 2021, eq. 1): weights only,
  ``Omega_i(c) = Tr(H_W)/n_W * ||Q_w(W) - W||^2``, and tie groups bind whole layers
  (the same weight *and* activation setting, as HAWQ-V3 ties the two convs that read a
  residual block's input). Ops without weights (``a @ b``) cost 0.
* ``hawq_v3_act`` (ours): HAWQ-V3 plus the activation operands, and ties on the
  activation setting only (the tensor two ops read is quantized once)::

      Omega_i(c) = Tr(H_W)/n_W * ||Q_w(W) - W||^2
                 + sum_a Tr(H_a)/n_a * E_x ||Q_a(a) - a||^2

  i.e. ``1/2 dW^T H dW`` with ``H`` replaced by its average eigenvalue (the factor
  1/2 is dropped: it does not change the argmin). ``E_x`` is the mean over
  calibration samples.
* ``hawq_v2``: the same objective as ``hawq_v3_act`` (V2's trace-weighted
  sensitivity, with activations).
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
from collections.abc import Callable, Mapping

import numpy as np
from torch import nn

from hawq.alloc.candidates import Candidate
from hawq.alloc.quant_error import ALevel, WLevel, activation_errors, weight_errors
from hawq.alloc.report import OPERANDS, OpCurvature
from hawq.errors import HawqError
from hawq.quant.plan import OpSetting, Plan

log = logging.getLogger("hawq")
__all__ = [
    "ACT_METHODS",
    "METHODS",
    "SETTINGS",
    "activation_errors",
    "curvature",
    "hawq_sensitivity",
    "measured_sensitivity",
    "noise_proxy",
    "random_sensitivity",
    "tie_level",
    "uniform_sensitivity",
    "weight_errors",
]

METHODS = ("hawq_v1", "hawq_v2", "hawq_v3", "hawq_v3_act", "measured", "uniform", "random")
#: methods whose objective has activation terms (they need calibration images)
ACT_METHODS = ("hawq_v1", "hawq_v2", "hawq_v3_act")
#: one line per method, written into bits.yaml (meta.setting)
SETTINGS = {
    "hawq_v3": "HAWQ-V3 exactly: weight-only objective sum_i Tr(H_i)/n_i ||Q(W_i)-W_i||^2, "
    "whole-layer ties",
    "hawq_v3_act": "ours: HAWQ-V3 + activation terms sum_a Tr(H_a)/n_a E||Q(a)-a||^2, "
    "activation-level ties",
    "hawq_v2": "HAWQ-V2 traces with activation terms, activation-level ties",
    "hawq_v1": "HAWQ-V1 top eigenvalue in place of the trace, activation terms, "
    "activation-level ties",
    "measured": "measured single-op PTQ accuracy drop, activation-level ties",
    "uniform": "noise proxy 4^-w + 4^-a (costs decide), activation-level ties",
    "random": "random op order r_i (4^-w + 4^-a), activation-level ties",
}


def tie_level(method: str) -> str:
    """``layer`` (whole candidate equal in a tie group) for HAWQ-V3, else ``activation``."""
    return "layer" if method == "hawq_v3" else "activation"


def curvature(mean: float, stderr: float | None, what: str = "") -> float:
    """The curvature allocation uses for an estimate ``mean +- stderr`` (module docstring):
    ``mean`` when its sign is determined positive, 0 when determined negative,
    ``mean + 2 stderr`` when undetermined, ``max(mean, 0)`` without a standard error."""
    if stderr is None or stderr != stderr:
        return max(mean, 0.0)
    if abs(mean) < 2 * stderr:
        log.info(
            "alloc: %s: curvature sign undetermined (%.3g +- %.3g); using the upper "
            "2-stderr bound %.3g",
            what,
            mean,
            stderr,
            mean + 2 * stderr,
        )
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
    method: str = "hawq_v3_act",
) -> np.ndarray:
    """``Omega_i(c)`` of the module docstring for each candidate of one op.

    Curvatures follow :func:`curvature` (the module docstring's rule: determined
    negative -> 0, undetermined sign -> the upper 2-stderr bound).
    """
    if method not in ("hawq_v1", "hawq_v2", "hawq_v3", "hawq_v3_act"):
        raise HawqError(
            f"hawq_sensitivity: method {method!r}; allowed: hawq_v1, hawq_v2, hawq_v3, hawq_v3_act"
        )
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
    a_curv = {
        k: curvature(curv.act_trace[k], curv.act_trace_stderr.get(k), f"op {curv.name} operand {k}")
        / max(curv.act_numel[k], 1)
        for k in OPERANDS[curv.kind]
    }
    out = np.zeros(len(cands))
    for j, c in enumerate(cands):
        if curv.kind != "matmul":
            out[j] += w_curv * w_err[(c.w_bits, c.w_format)]
        if c.a_bits is not None and method != "hawq_v3":  # HAWQ-V3: weights only
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
