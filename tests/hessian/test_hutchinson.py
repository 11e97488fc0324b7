"""Block traces from one full product per sample: unbiased, consistent, sum == whole."""

from __future__ import annotations

import pytest
import torch

from hawq.hessian import TraceEstimate, block_traces, layer_traces
from hawq.hessian.dense import dense_hessian
from hawq.hessian.hutchinson import RunningStats
from hawq.hessian.operator import HessianOperator

from .cases import CASES, DenseBlocks, deep_linear


@pytest.fixture(scope="module")
def mlp_dense():
    case = CASES["mlp"](n_batches=1, batch=8)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    # the explicit matrix as the operator keeps 4000 samples fast; HVPs are tested elsewhere
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    return op, dense


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp", "sandwich"])
def test_block_traces_within_3_stderr(mlp_dense, estimator):
    op, dense = mlp_dense
    res = block_traces(DenseBlocks(dense, op.blocks), rtol=1e-9, max_samples=4000, seed=3,
                       estimator=estimator, sketch=4)  # fmt: skip
    for name, s in op.blocks.items():
        est, exact = res.blocks[name], float(dense[s, s].trace())
        assert est.n_samples == 4000 and est.numel == s.stop - s.start
        assert abs(est.mean - exact) <= 3 * est.stderr, (name, est, exact)
        assert est.stderr < 0.2 * abs(exact)  # and it is informative
    assert abs(res.total.mean - float(dense.trace())) <= 3 * res.total.stderr
    assert res.total.mean == pytest.approx(sum(e.mean for e in res.blocks.values()), rel=1e-12)
    assert res.n_products == 4000 + (0 if estimator == "hutchinson" else 8)


def test_hutchpp_is_exact_when_the_sketch_spans_the_range(mlp_dense):
    op, dense = mlp_dense
    q, _ = torch.linalg.qr(dense[:, :8])
    low = q @ torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)) @ q.T  # rank 8
    for est in ("hutchpp", "sandwich"):
        res = block_traces(DenseBlocks(low, op.blocks), max_samples=3, min_samples=2,
                           estimator=est, sketch=8)  # fmt: skip
        _check_exact(res, low, op.blocks)


def _check_exact(res, low, blocks):
    for name, s in blocks.items():
        assert res.blocks[name].mean == pytest.approx(float(low[s, s].trace()), abs=1e-10)
        assert res.blocks[name].stderr < 1e-10


def test_layer_traces_api_on_the_real_operator_and_stopping_rule():
    case = deep_linear(n_batches=2)
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    seen = []
    traces = layer_traces(case.model, case.loss_fn, case.batches, rtol=0.1, max_samples=2000,
                          seed=0, backend="double_backward", estimator="hutchinson",
                          callback=lambda n, w: seen.append(w))  # fmt: skip
    assert list(traces) == list(op.blocks)
    n, drawn = next(iter(traces.values())).n_samples, len(seen)  # callback: every probe drawn
    assert 10 <= n <= drawn < 2000 and drawn % 2 == 0  # cross-fitted pairs
    assert seen[0] == float("inf") and all(0 < w < float("inf") for w in seen[1:])
    ts = list(traces.values())
    agg = sum(t.stderr**2 for t in ts) ** 0.5 / sum(abs(t.mean) for t in ts)
    assert 0.03 < agg < 0.2  # about rtol: each stream stopped at sqrt(2) rtol on its own
    for name, s in op.blocks.items():
        t = traces[name]
        assert isinstance(t, TraceEstimate)
        assert abs(t.mean - float(dense[s, s].trace())) <= 4 * t.stderr, name


def test_running_stats_matches_numpy():
    x = torch.randn(50, 3, dtype=torch.float64)
    st = RunningStats(3)
    for row in x:
        st.add(row)
    assert torch.allclose(st.mean, x.mean(0))
    assert torch.allclose(st.stderr, x.std(0) / 50**0.5)
