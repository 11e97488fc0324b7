"""SLQ: with as many steps as dimensions the quadrature nodes are the eigenvalues."""

from __future__ import annotations

import torch

from hawq.hessian import slq, spectral_density
from hawq.hessian.lanczos import lanczos_tridiag

from .cases import CASES
from .test_eigen import Dense


def _matrix(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 4.0, n, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T, lam


def test_lanczos_basis_is_orthonormal_and_tridiagonalises():
    a, _ = _matrix()
    tri = lanczos_tridiag(Dense(a), torch.randn(30, dtype=torch.float64), 12)
    q = torch.stack(tri.basis, 1)
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.T @ a @ q, tri.matrix(), atol=1e-10)


def test_full_slq_recovers_the_spectrum():
    a, lam = _matrix()
    d = slq(Dense(a), n_vectors=3, steps=30, seed=0)
    assert torch.allclose(d.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    for run in d.nodes.split(30):
        assert torch.allclose(run.sort().values, lam, atol=1e-8)
    # Gauss quadrature is exact for the first moment: sum w theta = mean of v^T A v / v^T v
    grid = torch.linspace(-2, 5, 2001, dtype=torch.float64)
    dens = d.evaluate(grid, sigma=0.05)
    assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 1e-6


def test_spectral_density_of_a_model_per_layer():
    case = CASES["mlp"]()
    out = spectral_density(case.model, case.loss_fn, case.batches, steps=8, per_layer=True)
    assert list(out) == ["", "0", "2"]
    for d in out.values():
        assert abs(float(d.weights.sum()) - 1) < 1e-10
