"""Cumulative INT4 curves: enable INT4 op by op in a sensitivity order, PTQ each prefix.

The seed study (section 1.2.1) ranked its ops by single-op INT4 PTQ accuracy, then
quantized them one by one in that order and read off how much of the computation can
run at INT4 within 2/5/10 points of the FP accuracy. This module does the same for
any op order; the ``int4_curve`` stage compares three of them:

* ``hessian``: ascending predicted sensitivity of moving op ``i`` from the high
  setting ``h`` to INT4 (``l`` = W4A4), with ``Omega_i`` of
  :mod:`hawq.alloc.sensitivity` (HAWQ-V3 by default)::

      Delta_i = Omega_i(l) - Omega_i(h)          (Omega_i(FP) = 0)

* ``measured``: ascending single-op PTQ accuracy drop relative to the all-high model
  (the seed study's ranking; equal to
  :func:`~hawq.alloc.sensitivity.measured_sensitivity` when the rest is FP)::

      d_i = acc(all at h) - acc(op i at l, the rest at h)

  measured on ``order_split`` (default ``val``: train images held out by
  ``data.val_size``), never on the test split the curves are scored on, which would let
  the order see its own test set (``n + 1`` evaluations for ``n`` ops).

* ``random``: seeded permutations (``random_orders`` of them, seeds ``seed, seed+1,
  ...``), reported as a mean +- std band of accuracy per prefix and of the largest
  shares within each threshold.

For an order ``pi`` and prefix length ``p`` the plan puts ``pi_1..pi_p`` at INT4 and
every other op at ``h``; its INT4 share of multiplications (``M_i`` MACs per image) is::

      s_p = sum_{j <= p} M_{pi_j} / sum_i M_i

so ``s_0 = 0`` and ``s_n = 1`` for every order, and the two end plans (all high, all
INT4) are the same whatever the order. The largest share within ``t`` points of FP is
``max {s_p : acc_p >= acc_FP - t}`` over the evaluated prefixes (a lower bound of the
true maximum when only every ``step``-th prefix is evaluated).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from hawq.alloc.allocate import choices_per_op, sensitivities
from hawq.alloc.candidates import Candidate
from hawq.alloc.report import HessianReport
from hawq.batches import batch_size as samples_in
from hawq.errors import HawqError
from hawq.quant.plan import OpSetting, Plan
from hawq.schema import require

log = logging.getLogger("hawq")
ORDERS = ("hessian", "measured", "random")
HESSIAN_METHODS = ("hawq_v1", "hawq_v2", "hawq_v3", "hawq_v3_act")
LOW = Candidate(4, 4)  # the INT4 setting the curve enables op by op
_SPEC = re.compile(r"^w([1-8])a([1-8])$")


def parse_rest(spec: str) -> Candidate:
    """``"fp"`` -> floating point; ``"w8a8"`` -> ``Candidate(8, 8)``."""
    if spec == "fp":
        return Candidate(None, None)
    m = _SPEC.match(spec)
    if m is None:
        raise HawqError(f"bad setting {spec!r}; allowed: fp or w<bits>a<bits> (e.g. w8a8)")
    return Candidate(int(m.group(1)), int(m.group(2)))


@dataclass
class CurveConfig:
    """Validated view of ``cfg.curve`` (see ``conf/curve/default.yaml``)."""

    orders: list[str] = field(default_factory=lambda: list(ORDERS))
    method: str = "hawq_v3_act"  # Hessian sensitivity of the hessian order
    rest: str = "w8a8"  # setting of the ops not (yet) at INT4: w<b>a<b> with max bits > 4, or fp
    step: int = 1  # evaluate every step-th prefix (the first and last always)
    seed: int = 0  # random order
    thresholds: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0])
    split: str = "test"  # split the curves are scored on
    order_split: str = "val"  # split the measured order is chosen on: val | train | test
    order_subset: int | None = None  # first N images of order_split (null: all)
    random_orders: int = 5  # random permutations: the band's mean +- std
    random_step: int | None = None  # prefix step of the random orders (null: step)
    batch_size: int | None = None  # evaluation batch size (null: data.eval_batch_size)
    calib_batches: int | None = None  # fixed calibration set (null: quant.calib_batches)
    calib_batch_size: int | None = None  # (null: quant.calib_batch_size)
    hessian: str | None = None  # default: <run_dir>/hessian.json
    out: str = "int4_curve.json"
    int2_plan_k: int | None = None  # write int2_k<k>_bits.yaml: k least sensitive ops at W2A2
    int2_order: str = "measured"  # the order that names the least sensitive ops
    int2_orders: list[str] | None = None  # several picks, e.g. [hessian, measured]
    all_int2: bool = False  # also the PTQ accuracy of every op at W2A2

    def __post_init__(self) -> None:
        ok = (
            len(self.orders) >= 1
            and len(set(self.orders)) == len(self.orders)
            and set(self.orders) <= set(ORDERS)
        )
        require(ok, "orders", self.orders, "a non-empty list of distinct " + ", ".join(ORDERS))
        require(self.method in HESSIAN_METHODS, "method", self.method, ", ".join(HESSIAN_METHODS))
        rest_ok = self.rest == "fp" or (
            _SPEC.match(self.rest) is not None and parse_rest(self.rest).max_bits("linear") > 4
        )
        require(rest_ok, "rest", self.rest, "fp or w<bits>a<bits> with a width above 4 (w8a8)")
        require(self.step >= 1, "step", self.step, "an integer >= 1")
        require(
            len(self.thresholds) >= 1 and all(t >= 0 for t in self.thresholds),
            "thresholds",
            self.thresholds,
            "a non-empty list of points >= 0",
        )
        require(self.split in ("train", "test"), "split", self.split, "train, test")
        require(
            self.order_split in ("val", "train", "test"),
            "order_split",
            self.order_split,
            "val, train, test",
        )
        require(
            self.order_subset is None or self.order_subset >= 1,
            "order_subset",
            self.order_subset,
            "null or an integer >= 1",
        )
        require(self.random_orders >= 1, "random_orders", self.random_orders, "an integer >= 1")
        require(
            self.random_step is None or self.random_step >= 1,
            "random_step",
            self.random_step,
            "null or an integer >= 1",
        )
        for key in ("batch_size", "calib_batches", "calib_batch_size"):
            v = getattr(self, key)
            require(v is None or v >= 1, key, v, "null or an integer >= 1")
        require(
            self.int2_plan_k is None or self.int2_plan_k >= 1,
            "int2_plan_k",
            self.int2_plan_k,
            "null or an integer >= 1",
        )
        require(
            self.int2_plan_k is None or self.int2_order in self.orders,
            "int2_order",
            self.int2_order,
            "one of curve.orders " + ", ".join(self.orders),
        )
        picks = self.int2_orders or []
        require(
            self.int2_plan_k is None or set(picks) <= set(self.orders),
            "int2_orders",
            self.int2_orders,
            "null or a list of curve.orders " + ", ".join(self.orders),
        )

    @property
    def int2_picks(self) -> list[str]:
        """The orders whose ``k`` least sensitive ops get an INT2 plan (first: the file
        ``int2_k<k>_bits.yaml``; others ``int2_k<k>_<order>_bits.yaml``)."""
        return list(dict.fromkeys(self.int2_orders or [self.int2_order]))

    @property
    def high(self) -> Candidate:
        return parse_rest(self.rest)


def hessian_sensitivity(
    report: HessianReport,
    model: nn.Module,
    calib_batches: Iterable,
    base: OpSetting,
    high: Candidate,
    low: Candidate = LOW,
    method: str = "hawq_v3_act",
) -> dict[str, float]:
    """``Delta_i = Omega_i(low) - Omega_i(high)`` per op, in the report's (network) order.

    Args:
        report: the parsed ``hessian.json``.
        model: the FP model (weight errors; activation errors on ``calib_batches``).
        calib_batches: ``(x, y)`` batches; all of them are used.
        base: the non-bit fields of both settings (``quant.default``).
        high / low: the two settings compared.
        method: ``hawq_v1``, ``hawq_v2``, ``hawq_v3`` (weights only) or ``hawq_v3_act``.
    """
    batches = list(calib_batches)
    cands = choices_per_op(report, [low, high], {})  # per op: [low, high] in canonical form
    n_images = sum(samples_in(b) for b in batches)
    sens, _ = sensitivities(
        method,
        report,
        cands,
        model,
        batches,
        len(batches),
        base,
        images=max(n_images, 1),
        rel_se=float("inf"),
    )  # all images
    return {n: float(s[0] - s[1]) for n, s in zip(report.ops, sens, strict=True)}


def ascending(values: Mapping[str, float]) -> list[str]:
    """Op names by ascending value, ties in the mapping's order (a stable argsort)."""
    names = list(values)
    idx = np.argsort(np.array([values[n] for n in names], dtype=float), kind="stable")
    return [names[i] for i in idx]


def random_order(ops: Sequence[str], seed: int) -> list[str]:
    """A permutation of ``ops`` drawn from ``numpy.random.default_rng(seed)``."""
    return [ops[i] for i in np.random.default_rng(seed).permutation(len(ops))]


def prefixes(n: int, step: int) -> list[int]:
    """``0, step, 2 step, ..., n`` (``n`` always included)."""
    out = list(range(0, n + 1, step))
    return out if out[-1] == n else [*out, n]


def int4_shares(sequence: Sequence[str], macs: Mapping[str, int], points: Sequence[int]):
    """``s_p`` of the module docstring for each prefix length ``p`` in ``points``."""
    total = float(sum(macs.values())) or 1.0
    cum = np.concatenate([[0.0], np.cumsum([float(macs[n]) for n in sequence])])
    return [float(cum[p] / total) for p in points]


def max_share_within(
    shares: Sequence[float], accs: Sequence[float], fp_acc: float, points: float
) -> float | None:
    """``max {s_p : acc_p >= fp_acc - points}``; None when no evaluated prefix qualifies."""
    ok = [s for s, a in zip(shares, accs, strict=True) if a >= fp_acc - points]
    return max(ok) if ok else None


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Spearman rank correlation ``rho`` (and its p-value) by :func:`scipy.stats.spearmanr`;
    None for a constant vector (rank correlation undefined)."""
    from scipy.stats import spearmanr

    res = spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if np.isnan(rho) else rho, "pvalue": None if np.isnan(p) else p}


def int2_plan(order: Sequence[str], k: int, base: OpSetting, bits: int = 2) -> Plan:
    """The first ``k`` ops of ``order`` at ``W<bits>A<bits>``, every other op floating point
    (the seed study's "INT2 on the six least sensitive ops")."""
    if not 1 <= k <= len(order):
        raise HawqError(
            f"curve.int2_plan_k={k} is invalid; allowed: 1..{len(order)} (the model's op count)"
        )
    low = replace(base, w_bits=bits, a_bits=bits)
    return Plan(replace(base, w_bits=None, a_bits=None), {n: low for n in order[:k]})


class PrefixEvaluator:
    """PTQ accuracy of "these ops at ``low``, the rest at ``high``", cached per op set.

    Every evaluation quantizes a fresh deep copy of the FP model with
    :func:`hawq.quant.api.quantize_`, calibrates it on the same fixed list of
    batches and evaluates it, so equal plans give equal accuracies.

    Args:
        model: the FP model (not modified).
        ops: the model's quantizable op names.
        low / high: settings of the enabled ops and of the rest.
        calib: the fixed calibration batches.
        evaluate_fn: ``model -> accuracy`` (percent).
        fold_bn: fold BatchNorm into quantized convs.
    """

    def __init__(
        self,
        model: nn.Module,
        ops: Sequence[str],
        low: OpSetting,
        high: OpSetting,
        calib: list,
        evaluate_fn: Callable[[nn.Module], float],
        fold_bn: bool = True,
    ) -> None:
        self.model, self.ops, self.low, self.high = model, list(ops), low, high
        self.calib, self.evaluate_fn, self.fold_bn = calib, evaluate_fn, fold_bn
        self.cache: dict[frozenset[str], float] = {}

    def plan(self, enabled: Iterable[str]) -> Plan:
        """``high`` as the default, ``low`` for every op of ``enabled``."""
        return Plan(self.high, {n: self.low for n in enabled})

    def ptq_accuracy(self, plan: Plan) -> float:
        """Quantize a copy with ``plan``, calibrate on the fixed batches, evaluate."""
        from hawq.quant.api import calibrate, quantize_

        m = quantize_(copy.deepcopy(self.model), plan, None, self.fold_bn)
        calibrate(m, self.calib)
        return float(self.evaluate_fn(m))

    def accuracy(self, enabled: Iterable[str]) -> float:
        key = frozenset(enabled)
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.ptq_accuracy(self.plan(key))
            log.info(
                "curve: evaluation %d (%d of %d ops low): acc %.2f in %.1f s",
                len(self.cache),
                len(key),
                len(self.ops),
                self.cache[key],
                time.perf_counter() - t0,
            )
        return self.cache[key]

    def single_op_drops(self) -> tuple[float, dict[str, float]]:
        """``(acc(all high), {op: d_i})`` with ``d_i`` of the module docstring."""
        ref = self.accuracy(())
        return ref, {n: ref - self.accuracy((n,)) for n in self.ops}

    def curve(self, sequence: Sequence[str], points: Sequence[int]) -> list[float]:
        """Accuracy with the first ``p`` ops of ``sequence`` at ``low``, for ``p`` in ``points``."""
        return [self.accuracy(sequence[:p]) for p in points]


def order_entry(
    sequence: Sequence[str],
    points: Sequence[int],
    accs: Sequence[float],
    macs: Mapping[str, int],
    fp_acc: float,
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """One order's record in ``int4_curve.json``."""
    shares = int4_shares(sequence, macs, points)
    n = len(sequence)
    return {
        "sequence": list(sequence),
        "prefixes": list(points),
        "shares": shares,  # of MACs
        "op_shares": [p / n for p in points],  # of ops (the seed study's 37/38)
        "accuracies": [float(a) for a in accs],
        "fp_acc": fp_acc,
        "max_share_within": {
            f"{t:g}": max_share_within(shares, accs, fp_acc, t) for t in thresholds
        },
        "max_op_share_within": {
            f"{t:g}": max_share_within([p / n for p in points], accs, fp_acc, t) for t in thresholds
        },
    }


def band(entries: Sequence[Mapping[str, Any]], thresholds: Sequence[float]) -> dict[str, Any]:
    """Mean +- std (``ddof=1``; 0 for one order) over orders evaluated at the same prefixes:
    accuracy per prefix and the largest INT4 share (of ops and of MACs) per threshold."""
    accs = np.array([e["accuracies"] for e in entries], dtype=float)  # (R, P)
    ddof = 1 if len(entries) > 1 else 0

    def stats(values: Sequence[float | None]) -> dict[str, Any]:
        v = np.array([np.nan if x is None else x for x in values], dtype=float)
        ok = v[~np.isnan(v)]
        return {
            "mean": float(ok.mean()) if ok.size else None,
            "std": float(ok.std(ddof=ddof if ok.size > 1 else 0)) if ok.size else None,
            "values": list(values),
        }

    return {
        "n": len(entries),
        "prefixes": list(entries[0]["prefixes"]),
        "op_shares": list(entries[0]["op_shares"]),
        "acc_mean": accs.mean(axis=0).tolist(),
        "acc_std": accs.std(axis=0, ddof=ddof).tolist(),
        "max_share_within": {
            f"{t:g}": stats([e["max_share_within"][f"{t:g}"] for e in entries]) for t in thresholds
        },
        "max_op_share_within": {
            f"{t:g}": stats([e["max_op_share_within"][f"{t:g}"] for e in entries])
            for t in thresholds
        },
    }
