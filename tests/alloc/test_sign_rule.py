"""How allocation treats uncertain curvature: lambda_max for hawq_v1 (from a real block whose
dominant eigenvalue is negative), the explicit sign rule for traces, the weight-only size."""

from __future__ import annotations

import logging

import pytest
import torch

from hawq.alloc import Candidate, OpCurvature
from hawq.alloc.report import parse_hessian
from hawq.alloc.sensitivity import curvature, hawq_sensitivity
from hawq.hessian import layer_eigenpairs
from hawq.hessian.dense import dense_hessian
from hawq.hessian.hutchinson import TraceEstimate
from hawq.hessian.operator import HessianOperator
from hawq.hessian.report import op_entry

CANDS = [Candidate(4, None), Candidate(8, None)]
W_ERR = {(4, "int"): 2.0, (8, "int"): 0.01}


def _curv(trace: float, stderr: float | None, **kw) -> OpCurvature:
    return OpCurvature("fc", "linear", 12, 100, trace=trace, top_eig=kw.pop("top_eig", None),
                       act_trace={"x": 0.0}, act_numel={"x": 4}, trace_stderr=stderr,
                       **kw)  # fmt: skip


@pytest.mark.parametrize(("mean", "se", "want"), [
    (3.0, 1.0, 3.0),  # determined positive: the estimate
    (-3.0, 1.0, 0.0),  # determined negative: 0
    (1.0, 0.6, 2.2),  # undetermined: upper 2-stderr bound
    (-1.0, 0.6, 0.2),  # undetermined negative: still > 0
    (-1.0, None, 0.0),  # no stderr: clamp
    (0.0, 0.0, 0.0),  # an exactly zero block
])  # fmt: skip
def test_curvature_rule(mean, se, want):
    assert curvature(mean, se) == pytest.approx(want)


def test_undetermined_trace_is_not_treated_as_flat(caplog):
    with caplog.at_level(logging.INFO, logger="hawq"):
        s = hawq_sensitivity(_curv(-0.5, 1.0), CANDS, W_ERR, {"x": {}}, "hawq_v3")
    assert s == pytest.approx([1.5 / 12 * 2.0, 1.5 / 12 * 0.01])
    assert "undetermined" in caplog.text
    # the same trace spanning fewer elements (weight only) has a larger per-element curvature
    s_w = hawq_sensitivity(_curv(-0.5, 1.0, trace_numel=10), CANDS, W_ERR, {"x": {}}, "hawq_v3")
    assert s_w == pytest.approx([1.5 / 10 * 2.0, 1.5 / 10 * 0.01])


def test_hawq_v1_lambda_max_end_to_end():
    """MLP block ``0`` has a negative dominant eigenvalue; largest magnitude would give it
    zero curvature, lambda_max (positive) does not."""
    from tests.hessian.cases import CASES

    case = CASES["mlp"]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    s = op.blocks["0"]
    ev = torch.linalg.eigvalsh(dense[s, s])
    assert abs(float(ev[0])) > abs(float(ev[-1])) > 0  # dominant is negative
    pairs = layer_eigenpairs(op, top_k=2, tol=1e-8, max_iter=200)  # default: LA
    entry = op_entry("linear", op.numel["0"], 1, TraceEstimate(1.0, 0.1, 10, 20), pairs["0"],
                     {"x": TraceEstimate(0.0, 0.0, 10, 5)}, trace_numel=op.numel["0"])  # fmt: skip
    assert entry["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-8)
    report = {"schema": 1, "eig_which": "LA", "ops": {"0": entry}}
    curv = parse_hessian(report).ops["0"]
    assert curv.top_eig == pytest.approx(float(ev[-1]), rel=1e-8)
    got = hawq_sensitivity(curv, CANDS, W_ERR, {"x": {}}, "hawq_v1")
    assert got[0] == pytest.approx(float(ev[-1]) / op.numel["0"] * 2.0, rel=1e-8) and got[0] > 0


def test_magnitude_ordered_report_warns(caplog):
    e = {"kind": "linear", "numel": 4, "macs": 1, "trace": 1.0, "eigenvalues": [-2.0],
         "act_trace": {"x": 1.0}, "act_numel": {"x": 1}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hawq"):
        parse_hessian({"schema": 1, "ops": {"fc": e}})
    assert "ordered by magnitude" in caplog.text
