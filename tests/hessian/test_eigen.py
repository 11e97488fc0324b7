"""Top eigenvalues (power iteration, Lanczos) equal ``eigvalsh`` of the dense block (1e-6)."""

from __future__ import annotations

import pytest
import torch

from hawq.hessian import lanczos, layer_eigenpairs, layer_eigenvalues, power_iteration
from hawq.hessian.dense import dense_hessian
from hawq.hessian.operator import HessianOperator

from .cases import CASES


class Dense:
    """A dense symmetric matrix as an operator."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.shape, self.dtype, self.device = a, a.shape, a.dtype, a.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.a @ v


def _top(a: torch.Tensor, k: int) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(a)
    return ev[ev.abs().argsort(descending=True)][:k]


@pytest.mark.parametrize("solve", [power_iteration, lanczos])
def test_dense_matrix_with_known_spectrum(solve):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([10.0, -7.0, 5.0]), torch.linspace(-2, 2, 37)]).double()
    res = solve(Dense(q @ torch.diag(lam) @ q.T), top_k=3, tol=1e-9, max_iter=2000)
    assert res.values == pytest.approx([10.0, -7.0, 5.0], rel=1e-9)
    assert all(r <= 1e-8 for r in res.residuals)
    for v, l in zip(res.vectors, [10.0, -7.0, 5.0]):
        assert abs(abs(float(v @ q[:, lam.tolist().index(l)])) - 1) < 1e-9


@pytest.mark.parametrize(
    ("case_name", "method"), [("vit", "lanczos"), ("cnn", "lanczos"), ("mlp", "power")]
)
def test_block_eigenvalues_match_eigvalsh(case_name, method):
    case = CASES[case_name]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    # eigenvalue error ~ residual^2 * |lambda| / gap: a 1e-5 residual is ample for 1e-6
    # power: later pairs' TRUE residuals are floored by the earlier pairs' accuracy
    pairs = layer_eigenpairs(op, top_k=2, tol=1e-8 if method == "power" else 1e-5,
                             max_iter=3000 if method == "power" else 300, method=method,
                             which="LM")  # fmt: skip
    for name, s in op.blocks.items():
        want = _top(dense[s, s], 2)
        got = torch.tensor(pairs[name].values, dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-12), (name, got, want)
        assert all(r <= 1e-5 for r in pairs[name].residuals) and all(pairs[name].converged)
        assert pairs[name].iterations >= 2


def test_layer_eigenvalues_api():
    case = CASES["mlp"]()
    eigs = layer_eigenvalues(case.model, case.loss_fn, case.batches, top_k=1, tol=1e-8,
                             which="LM")  # fmt: skip
    assert list(eigs) == ["0", "2"]
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    for name, s in op.blocks.items():
        assert eigs[name][0] == pytest.approx(float(_top(dense[s, s], 1)[0]), rel=1e-6)
