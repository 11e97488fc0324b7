"""Block-trace estimators against dense oracles: the sandwich default, the aggregate stop rule,
calibrated standard errors (a statistical test), the weight's own block."""

from __future__ import annotations

import math

import pytest
import torch

from hawq.hessian import block_traces, layer_traces
from hawq.hessian.dense import dense_hessian
from hawq.hessian.hutchinson import TraceEstimate, aggregate_rel_stderr
from hawq.hessian.operator import HessianOperator, op_blocks

from .cases import DenseBlocks, linear_mse


def curvature_like(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Indefinite, a few dominant directions (like a trained net's Hessian), 4 blocks, one of
    them with a near-zero trace but a large variance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = 30.0 * 0.6 ** torch.arange(n, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g,
                                                                                 dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    blocks = {"a": slice(0, 10), "b": slice(10, 22), "c": slice(22, 36), "d": slice(36, 48)}
    s = blocks["d"]  # make block d's trace ~0: shift its diagonal
    a[s, s] -= torch.eye(12, dtype=torch.float64) * float(a[s, s].trace()) / 12
    return a, blocks


def exact(a: torch.Tensor, blocks: dict) -> dict[str, float]:
    return {k: float(a[s, s].trace()) for k, s in blocks.items()}


def test_near_zero_trace_still_stops_and_the_statistic_is_the_aggregate():
    a, blocks = curvature_like()
    assert abs(exact(a, blocks)["d"]) < 1e-12
    for est in ("sandwich", "hutchpp", "hutchinson"):
        res = block_traces(DenseBlocks(a, blocks), rtol=0.05, max_samples=5000, estimator=est,
                           sketch=4, seed=1)  # fmt: skip
        n = res.blocks["a"].n_samples
        assert n < 5000, est  # every-op rtol would need ~forever for block d
        means = torch.tensor([e.mean for e in res.blocks.values()])
        ses = torch.tensor([e.stderr for e in res.blocks.values()])
        assert res.rel_stderr == pytest.approx(aggregate_rel_stderr(means, ses))
        assert res.rel_stderr <= 1.5 * 0.05  # about rtol (each stream stops at sqrt(2) rtol)
        assert res.n_products >= n + (0 if est == "hutchinson" else 8)  # + decision-only probes


@pytest.mark.parametrize("estimator", ["sandwich", "hutchinson"])
def test_stderr_is_calibrated_and_estimates_unbiased_under_the_stop_rule(estimator):
    """300 independent runs stopped by the aggregate rule: per block, the mean error is
    within 4 standard errors of 0 (unbiased) and about 95% of the runs have
    |estimate - exact| <= 2 reported stderr (t with >= 9 dof: ~92-95%)."""
    a, blocks = curvature_like(seed=2)
    truth = exact(a, blocks)
    op = DenseBlocks(a, blocks)
    errs = {k: [] for k in blocks}
    cover = {k: 0 for k in blocks}
    runs = 300
    for seed in range(runs):
        res = block_traces(op, rtol=0.1, max_samples=400, min_samples=10, estimator=estimator,
                           sketch=3, seed=seed)  # fmt: skip
        for k, e in res.blocks.items():
            errs[k].append(e.mean - truth[k])
            cover[k] += abs(e.mean - truth[k]) <= 2 * e.stderr
    for k in blocks:
        e = torch.tensor(errs[k])
        assert abs(float(e.mean())) <= 4 * float(e.std()) / math.sqrt(runs), (k, float(e.mean()))
        assert 0.86 <= cover[k] / runs <= 0.99, (k, cover[k] / runs)


def test_sandwich_beats_hutchpp_and_hutchinson_at_equal_products():
    a, blocks = curvature_like(seed=3)
    truth = torch.tensor(list(exact(a, blocks).values()))
    err = {}
    for est in ("sandwich", "hutchpp", "hutchinson"):
        e = []
        for seed in range(20):
            budget = 24  # products: sketch 6 (12) + 12 samples for the sketched ones
            n = budget - (0 if est == "hutchinson" else 12)
            res = block_traces(DenseBlocks(a, blocks), rtol=1e-12, max_samples=n, min_samples=n,
                               estimator=est, sketch=6, seed=seed)  # fmt: skip
            assert res.n_products == budget
            got = torch.tensor([x.mean for x in res.blocks.values()])
            e.append(float((got - truth).abs().sum() / truth.abs().sum()))
        err[est] = sum(e) / len(e)
    assert err["sandwich"] < 0.5 * err["hutchpp"] and err["hutchpp"] < err["hutchinson"], err


def test_sandwich_exact_part_plus_residual_trace_is_the_block_trace():
    """Deterministic identity behind the estimator, for any orthonormal Q:
    tr_l(A) = tr_l(QCQ^T + QZ^T + ZQ^T) + tr_l((I-P)A(I-P))."""
    a, blocks = curvature_like(seed=4)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(48, 5, generator=g, dtype=torch.float64))
    p = q @ q.T
    i = torch.eye(48, dtype=torch.float64)
    c = q.T @ a @ q
    z = (i - p) @ a @ q
    parts = q @ c @ q.T + q @ z.T + z @ q.T + (i - p) @ a @ (i - p)
    assert torch.allclose(parts, a, atol=1e-12)
    for s in blocks.values():
        assert float(torch.diag(q @ z.T + z @ q.T)[s].sum()) != pytest.approx(0.0, abs=1e-6)
    assert float(torch.trace(q @ z.T)) == pytest.approx(0.0, abs=1e-12)


def test_traces_are_of_the_weight_block():
    """Linear + squared error: H_WW = I_out (x) 2/N X^T X, so tr = d_out * 2/N * ||X||_F^2;
    with the bias the block adds tr(H_bb) = 2 d_out."""
    case = linear_mse(n=7, d_in=4, d_out=3)
    x = case.batches[0][0]
    want_w = 3 * 2 / 7 * float((x**2).sum())
    tr = layer_traces(case.model, case.loss_fn, case.batches, sketch=20, max_samples=3,
                      min_samples=2, backend="double_backward")["0"]  # fmt: skip
    assert tr.numel == 12 and tr.mean == pytest.approx(want_w, rel=1e-10)
    op = HessianOperator(case.model, case.loss_fn, case.batches,
                         blocks=op_blocks(case.model, include_bias=True))  # fmt: skip
    both = block_traces(op, sketch=20, max_samples=3, min_samples=2).blocks["0"]
    assert both.numel == 15 and both.mean == pytest.approx(want_w + 2 * 3, rel=1e-10)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, [case.model[0].weight])
    assert float(dense.trace()) == pytest.approx(want_w, rel=1e-12)


def test_sign_undetermined_flag():
    assert TraceEstimate(1.0, 0.6, 10, 4).sign_undetermined
    assert TraceEstimate(-1.0, 0.6, 10, 4).sign_undetermined
    assert not TraceEstimate(-1.3, 0.6, 10, 4).sign_undetermined
    assert not TraceEstimate(0.0, 0.0, 10, 4).sign_undetermined
