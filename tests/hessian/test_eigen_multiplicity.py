"""Top-k eigenvalues WITH multiplicity, LA vs LM order, true residuals and converged flags.

Oracles: ``eigvalsh`` of dense matrices with exact and near-exact repeated eigenvalues, and
of dense Hessian blocks of tiny float64 models (a Linear + squared error block is
:math:`I_{out} \\otimes \\frac2N X^\\top X`: every eigenvalue repeated ``d_out`` times).
"""

from __future__ import annotations

import logging

import pytest
import torch

from hawq.hessian import lanczos, layer_eigenpairs, layer_eigenvalues, power_iteration
from hawq.hessian.dense import dense_hessian
from hawq.hessian.operator import HessianOperator

from .cases import CASES, linear_mse


class Dense:
    """A dense symmetric matrix as an operator (counts products)."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.shape, self.dtype, self.device = a, a.shape, a.dtype, a.device
        self.products = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1 if v.ndim == 1 else v.shape[1]
        return self.a @ v


def with_spectrum(lam: list[float], n: int = 120, seed: int = 0, tail: float = 0.7) -> torch.Tensor:
    """Random orthogonal basis, the given leading eigenvalues, the rest uniform in
    ``tail * max|lam| * [-1, 1]`` (a dense tail close to the top: a single start vector's
    rounding errors do not reveal a second copy of the top eigenvalue quickly)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top = max(abs(x) for x in lam)
    rest = (torch.rand(n - len(lam), generator=g, dtype=torch.float64) * 2 - 1) * tail * top
    return q @ torch.diag(torch.cat([torch.tensor(lam, dtype=torch.float64), rest])) @ q.T


def truth(a: torch.Tensor, k: int, which: str) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(a)
    key = ev if which == "LA" else ev.abs()
    return ev[key.argsort(descending=True)][:k]


SPECTRA = [
    [6.0, 6.0, 3.0],  # exact double top
    [6.0, 6.0, 6.0, 2.0],  # exact triple top
    [6.0, 6.0 - 1e-7, 6.0 - 2e-7, 2.0],  # near-exact cluster
    [5.0, 4.0, 4.0, -1.5],  # repeated second value
    [-8.0, -8.0, 3.0, 3.0],  # repeated negative dominant + repeated positive
    [4.0, -4.0, 2.0],  # opposite-sign tie
]


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("which", ["LA", "LM"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_top_k_with_multiplicity(spectrum, which, seed):
    a = with_spectrum(spectrum, seed=seed)
    k = len(spectrum)
    res = lanczos(Dense(a), top_k=k, tol=1e-7, max_iter=600, seed=seed, which=which)
    want = truth(a, k, which)
    got = torch.tensor(res.values, dtype=torch.float64)
    if which == "LM":  # +-4 tie: the order within a tie is arbitrary
        got, want = got.sort().values, want.sort().values
    # |theta - lambda| <= residual * |lambda| per pair, <= residual^2 / gap off clusters
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-12), (res.values, want)
    assert all(res.converged) and res.which == which
    for lam, v, r in zip(res.values, res.vectors, res.residuals):  # residuals are of A itself
        assert r == pytest.approx(float((a @ v - lam * v).norm()) / abs(lam), rel=1e-6, abs=1e-14)
    vecs = torch.stack(res.vectors, 1)
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_power_iteration_top_k_with_multiplicity(which):
    a = with_spectrum([6.0, 6.0, -3.0, 2.0], n=60, seed=3, tail=0.2)
    res = power_iteration(Dense(a), top_k=3, tol=1e-9, max_iter=3000, which=which)
    want = truth(a, 3, which)
    assert torch.allclose(torch.tensor(res.values, dtype=torch.float64), want, rtol=1e-8)
    assert all(res.converged)
    for lam, v, r in zip(res.values, res.vectors, res.residuals):  # not the deflated operator's
        assert r == pytest.approx(float((a @ v - lam * v).norm()) / abs(lam), rel=1e-6, abs=1e-14)


def test_power_iteration_flags_an_opposite_sign_tie_and_the_api_warns(caplog):
    a = with_spectrum([4.0, -4.0, 1.0], seed=2)
    res = power_iteration(Dense(a), top_k=1, tol=1e-8, max_iter=150, which="LM")
    assert res.converged == [False] and res.residuals[0] > 1e-8 and res.iterations == 150
    r = float((a @ res.vectors[0] - res.values[0] * res.vectors[0]).norm()) / abs(res.values[0])
    assert res.residuals[0] == pytest.approx(r, rel=1e-6)
    # the same operator through the public API logs the unconverged pair
    case = CASES["mlp"]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    with caplog.at_level(logging.WARNING, logger="hawq"):
        pairs = layer_eigenpairs(op, top_k=2, tol=1e-12, max_iter=3, method="power")
    assert not all(pairs["0"].converged)
    assert "not converged" in caplog.text


def test_linear_block_eigenvalues_repeat_d_out_times():
    case = linear_mse(n=9, d_in=4, d_out=3, seed=1)
    op = HessianOperator(case.model, case.loss_fn, case.batches)  # weight block: 12 x 12
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    want = truth(dense, 5, "LA")
    assert torch.allclose(want[:3], want[0].expand(3)) and want[3] < want[2] - 1e-6
    for method, kw in (("lanczos", {}), ("power", {"max_iter": 3000})):
        got = layer_eigenvalues(case.model, case.loss_fn, case.batches, top_k=5, tol=1e-10,
                                method=method, **kw)["0"]  # fmt: skip
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, rtol=1e-8), method


@pytest.mark.parametrize("case_name", ["mlp", "vit", "cnn"])
def test_model_blocks_la_and_lm_match_eigvalsh(case_name):
    case = CASES[case_name]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    differ = 0
    for which in ("LA", "LM"):
        pairs = layer_eigenpairs(op, top_k=2, tol=1e-8, max_iter=400, which=which)
        for name, s in op.blocks.items():
            want = truth(dense[s, s], 2, which)
            got = torch.tensor(pairs[name].values, dtype=torch.float64)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-10), (name, which, got, want)
            assert all(pairs[name].converged)
            differ += which == "LA" and float(truth(dense[s, s], 1, "LM")[0]) < 0
    if case_name == "mlp":
        assert differ >= 1  # a block whose dominant eigenvalue is negative: LA != LM


def test_zero_block_does_not_crash():
    case = CASES["mlp"]()
    with torch.no_grad():
        case.model[2].weight.zero_()  # zero head: the first layer's block is exactly 0
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    s = op.blocks["0"]
    assert float(dense[s, s].abs().max()) == 0.0
    for method in ("lanczos", "power"):
        for which in ("LA", "LM"):
            res = layer_eigenpairs(op, top_k=3, tol=1e-6, max_iter=50, method=method,
                                   which=which)["0"]  # fmt: skip
            assert res.values == [0.0, 0.0, 0.0] and all(res.converged), (method, which)
    res = lanczos(Dense(torch.zeros(7, 7, dtype=torch.float64)), top_k=9)
    assert res.values == [0.0] * 7 and res.residuals == [0.0] * 7


def test_rank_deficient_block_gets_all_copies():
    """Rank 2 with a triple zero beyond: the Krylov space closes after 1 block step; the
    rest is found by extending with random directions."""
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(20, 2, generator=g, dtype=torch.float64))[0]
    a = u @ torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64)) @ u.T
    res = lanczos(Dense(a), top_k=4, tol=1e-10, which="LA")
    assert res.values == pytest.approx([3.0, 0.0, 0.0, 0.0], abs=1e-10)
    res = lanczos(Dense(a), top_k=2, tol=1e-10, which="LM")
    assert res.values == pytest.approx([3.0, -1.0], abs=1e-10)
