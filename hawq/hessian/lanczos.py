"""Lanczos tridiagonalisation and top-k eigenpairs from it.

Starting from a unit vector :math:`q_1`, Lanczos builds an orthonormal basis
:math:`Q_m = [q_1 \\dots q_m]` of the Krylov space
:math:`\\mathcal K_m(A, q_1)` with

.. math::  A Q_m = Q_m T_m + \\beta_m q_{m+1} e_m^\\top, \\qquad
           T_m = \\mathrm{tridiag}(\\beta_{1:m-1}, \\alpha_{1:m}, \\beta_{1:m-1}).

Full re-orthogonalisation (Gram-Schmidt against all earlier :math:`q_i`, twice)
keeps :math:`Q_m` orthonormal in floating point. If :math:`T_m = S \\Theta S^\\top`,
the Ritz pairs :math:`(\\theta_i, Q_m s_i)` approximate eigenpairs of :math:`A`
with residual :math:`\\lVert A y_i - \\theta_i y_i \\rVert = |\\beta_m s_{m,i}|`,
which is the stopping test; the returned residuals are recomputed with one
explicit product per pair. The extreme eigenvalues converge in far fewer
products than power iteration needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hawq.hessian.power import EigenResult, relative_residual


@dataclass
class Tridiagonal:
    """Result of :func:`lanczos_tridiag`: :math:`T_m` (as diagonals) and :math:`Q_m`."""

    alpha: torch.Tensor  # (m,) float64
    beta: torch.Tensor  # (m,) float64; beta[-1] couples to the next (unbuilt) vector
    basis: list[torch.Tensor]  # m unit vectors
    next: torch.Tensor | None = None  # q_{m+1}; None after an invariant subspace

    def matrix(self) -> torch.Tensor:
        """:math:`T_m` as a dense (m, m) float64 matrix."""
        off = self.beta[:-1]
        return torch.diag(self.alpha) + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of :math:`T_m`."""
        return torch.linalg.eigh(self.matrix())


def lanczos_step(op: Any, tri: Tridiagonal, v: torch.Tensor) -> Tridiagonal:
    """Append one Lanczos vector; ``v`` is the next unit vector (``q_{m+1}``)."""
    basis = [*tri.basis, v]
    w = op @ v
    a = torch.dot(v, w)
    w = w - a * v
    if len(basis) > 1:
        w = w - tri.beta[-1].to(w.dtype) * basis[-2]
    for _ in range(2):  # full re-orthogonalisation, twice is enough
        for q in basis:
            w = w - torch.dot(q, w) * q
    b = torch.linalg.vector_norm(w)
    alpha = torch.cat([tri.alpha, a.double().reshape(1).cpu()])
    beta = torch.cat([tri.beta, b.double().reshape(1).cpu()])
    return Tridiagonal(alpha, beta, basis, w / b if b > 0 else None)


def lanczos_tridiag(op: Any, v0: torch.Tensor, steps: int) -> Tridiagonal:
    """Run ``steps`` Lanczos steps from ``v0`` (stops early on an invariant subspace)."""
    tri = Tridiagonal(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [])
    v = v0 / torch.linalg.vector_norm(v0)
    for _ in range(min(steps, op.shape[0])):
        tri = lanczos_step(op, tri, v)
        v = tri.next
        if v is None or float(tri.beta[-1]) <= 1e-12 * float(tri.alpha.abs().max()):
            break
    return tri


def _top_by_magnitude(theta: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(theta.abs(), descending=True)[:k]


def lanczos(
    op: Any, top_k: int = 1, tol: float = 1e-4, max_iter: int = 200, seed: int = 0
) -> EigenResult:
    """Top-``top_k`` eigenpairs (largest magnitude) of symmetric ``op`` by Lanczos.

    Args:
        op: symmetric operator with ``@``, ``shape``, ``dtype``, ``device``.
        top_k: pairs to return (capped at the dimension).
        tol: stop when every wanted Ritz pair has :math:`|\\beta_m s_{m,i}|/|\\theta_i| \\le` tol.
        max_iter: Lanczos steps at most (each one product).
        seed: the start vector is Gaussian from this seed.

    Returns:
        :class:`EigenResult`; ``iterations`` counts all products, including the
        ``top_k`` used to recompute residuals.
    """
    n = op.shape[0]
    k = min(top_k, n)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    tri = Tridiagonal(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [])
    v = v / torch.linalg.vector_norm(v)
    for _ in range(min(max_iter, n)):
        tri = lanczos_step(op, tri, v)
        theta, s = tri.ritz()
        want = _top_by_magnitude(theta, k)
        est = (tri.beta[-1] * s[-1, want]).abs() / theta[want].abs().clamp_min(1e-300)
        v = tri.next
        if len(tri.basis) >= k and (v is None or bool((est <= tol).all())):
            break
    theta, s = tri.ritz()
    want = _top_by_magnitude(theta, k)
    q = torch.stack(tri.basis, dim=1)  # (n, m)
    res = EigenResult(iterations=len(tri.basis))
    for i in want.tolist():
        y = q @ s[:, i].to(q.dtype)
        y = y / torch.linalg.vector_norm(y)
        lam = float(theta[i])
        res.values.append(lam)
        res.vectors.append(y)
        res.residuals.append(relative_residual(op @ y, y, lam))
        res.iterations += 1
    return res
