"""Cross-check with the ``pyhessian`` package (0.1): whole-model top eigenvalue and trace.

pyhessian 0.1 on current torch: it defaults to ``cuda=True``, forces
``model.eval()``, accumulates into existing ``.grad`` (zero them first),
``density()`` fails (``torch.eig`` was removed) and ``trace()`` stops when
``|mean - prev| / (prev + 1e-6) < tol`` without ``abs`` in the denominator, so
a negative first sample ends it at once. Its ``tol`` is a relative change of
consecutive eigenvalue estimates, not a residual.
"""

from __future__ import annotations

import pytest
import torch

from hawq.hessian import HessianOperator, block_traces, lanczos

from .cases import CASES

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture(scope="module")
def setup():
    case = CASES["mlp"](n_batches=1, batch=16)
    model = case.model
    params = {"all": [p for p in model.parameters() if p.requires_grad]}
    op = HessianOperator(model, case.loss_fn, case.batches, blocks=params)
    model.zero_grad(set_to_none=True)
    ph = pyhessian.hessian(model, case.loss_fn, data=case.batches[0], cuda=False)
    yield case, op, ph
    model.zero_grad(set_to_none=True)


def test_top_eigenvalue_agrees(setup):
    _, op, ph = setup
    ours = lanczos(op, top_k=1, tol=1e-8, max_iter=200)
    torch.manual_seed(0)
    theirs, _ = ph.eigenvalues(maxIter=1000, tol=1e-8, top_n=1)
    # power iteration finds the largest |lambda|; the MLP's top eigenvalue is positive
    assert theirs[0] == pytest.approx(ours.values[0], rel=1e-4)


def test_whole_model_trace_agrees(setup):
    _, op, ph = setup
    exact = float(torch.diag(op @ torch.eye(op.size, dtype=torch.float64)).sum())
    ours = block_traces(op, rtol=1e-9, max_samples=2000, seed=0, estimator="hutchinson")
    assert abs(ours.total.mean - exact) <= 3 * ours.total.stderr
    # the default sandwich with a sketch as wide as the matrix is exact
    sandwich = block_traces(op, max_samples=3, min_samples=2, seed=0, sketch=op.size)
    assert sandwich.total.mean == pytest.approx(exact, rel=1e-10)
    torch.manual_seed(0)
    # one call of 2000 stops at the first negative running mean (its missing abs):
    assert len(ph.trace(maxIter=2000, tol=0.0)) < 2000
    samples = [s for _ in range(2000) for s in ph.trace(maxIter=1)]  # one sample per call
    theirs = float(torch.tensor(samples).mean())
    se = float(torch.tensor(samples).std()) / len(samples) ** 0.5
    assert abs(theirs - exact) <= 3 * se
    assert abs(theirs - ours.total.mean) <= 3 * (se**2 + ours.total.stderr**2) ** 0.5
