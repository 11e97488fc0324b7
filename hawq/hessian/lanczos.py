"""Lanczos tridiagonalisation (for SLQ) and top-k eigenpairs by block Lanczos.

Starting from a unit vector :math:`q_1`, Lanczos builds an orthonormal basis
:math:`Q_m = [q_1 \\dots q_m]` of the Krylov space
:math:`\\mathcal K_m(A, q_1)` with

.. math::  A Q_m = Q_m T_m + \\beta_m q_{m+1} e_m^\\top, \\qquad
           T_m = \\mathrm{tridiag}(\\beta_{1:m-1}, \\alpha_{1:m}, \\beta_{1:m-1}).

Full re-orthogonalisation (Gram-Schmidt against all earlier :math:`q_i`, twice)
keeps :math:`Q_m` orthonormal in floating point. If :math:`T_m = S \\Theta S^\\top`,
the Ritz pairs :math:`(\\theta_i, Q_m s_i)` approximate eigenpairs of :math:`A`
with residual :math:`\\lVert A y_i - \\theta_i y_i \\rVert = |\\beta_m s_{m,i}|`,
which is the stopping test. The extreme eigenvalues converge in far fewer
products than power iteration needs.

Multiplicity: a single start vector :math:`q_1` only sees the component of each
eigenspace along :math:`q_1`, so an eigenvalue of multiplicity 2 appears ONCE in
:math:`T_m` (and its residual looks perfect): the "second" top eigenvalue would
be the next distinct one. :func:`lanczos` therefore runs *block* Lanczos with
``p = max(top_k, 2)`` start vectors (a block Krylov space
:math:`\\mathrm{span}\\{Q_1, AQ_1, A^2Q_1, \\dots\\}`), which resolves every
multiplicity up to ``p`` and clusters of up to ``p`` nearly equal values, with
Rayleigh-Ritz on the whole orthonormal basis :math:`Q` (:math:`T = Q^\\top A Q`).
Columns of a new block that are (numerically) in the span already are dropped;
when a whole block is (an invariant subspace, e.g. an exactly zero block) the
space is extended by fresh random vectors orthogonal to :math:`Q`, so eigenvalues
of any multiplicity are eventually found and nothing divides by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hawq.hessian.power import EigenResult, check_which, relative_residual


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


def order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``theta`` largest first: algebraically (``LA``) or by magnitude (``LM``)."""
    key = theta if which == "LA" else theta.abs()
    return torch.argsort(key, descending=True, stable=True)


def _orthonormal_columns(x: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Orthonormal basis of the part of ``x`` (n, p) orthogonal to ``q`` (n, m); directions
    whose norm is at most ``scale * 1e3 * eps`` (numerically in span(q)) are dropped."""
    for _ in range(2):  # full re-orthogonalisation, twice is enough
        x = x - q @ (q.T @ x)
    u, sv, _ = torch.linalg.svd(x, full_matrices=False)
    ref = scale if scale > 0 else float(sv.max())  # a fresh random block: relative rank
    return u[:, sv > 1e3 * torch.finfo(x.dtype).eps * max(ref, 1e-300)]


def lanczos(
    op: Any,
    top_k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    which: str = "LM",
    block: int | None = None,
) -> EigenResult:
    """Top-``top_k`` eigenpairs of symmetric ``op`` (with multiplicity) by block Lanczos.

    Args:
        op: symmetric operator with ``@``, ``shape``, ``dtype``, ``device``.
        top_k: pairs to return (capped at the dimension).
        tol: stop when every wanted Ritz pair has
            :math:`\\lVert (I - QQ^\\top) A Q s_i \\rVert \\le \\tfrac12` tol :math:`|\\theta_i|`
            (half: the returned residual is recomputed and ``converged`` means <= tol).
        max_iter: products at most (a block step costs one product per column).
        seed: the start block is Gaussian from this seed.
        which: ``LA`` (largest algebraic first: :math:`\\lambda_{\\max}`, what bounds
            :math:`\\delta^\\top A\\delta/\\lVert\\delta\\rVert^2`) or ``LM`` (largest magnitude).
        block: block size (default ``max(top_k, 2)``); resolves multiplicities up to it.

    Returns:
        :class:`EigenResult` with true residuals :math:`\\lVert Ay - \\theta y\\rVert/|\\theta|`
        (one explicit product per pair) and ``converged``; ``iterations`` counts all
        products, those residual products included.
    """
    check_which(which)
    n = op.shape[0]
    k = min(top_k, n)
    p = min(block or max(top_k, 2), n)
    gen = torch.Generator().manual_seed(seed)

    def fresh(q: torch.Tensor) -> torch.Tensor:
        x = torch.randn(n, p, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        return _orthonormal_columns(x, q, 0.0)

    q = torch.zeros(n, 0, dtype=op.dtype, device=op.device)  # orthonormal basis
    t = torch.zeros(0, 0, dtype=torch.float64)  # Q^T A Q
    new, products, scale = fresh(q), 0, 0.0
    while True:
        w = op @ new  # (n, b)
        products += new.shape[1]
        q = torch.cat([q, new], dim=1)
        c = (q.T @ w).double().cpu()  # (m, b): new columns of T
        m, b = q.shape[1], new.shape[1]
        t_new = torch.zeros(m, m, dtype=torch.float64)
        t_new[: m - b, : m - b] = t
        t_new[:, m - b :] = c
        t_new[m - b :, :] = c.T
        t = 0.5 * (t_new + t_new.T)
        theta, s = torch.linalg.eigh(t)
        scale = max(scale, float(theta.abs().max()))
        x = w - q @ (q.T @ w)  # (I - QQ^T) A Q_new: the residual directions
        want = order(theta, which)[:k]
        est = torch.linalg.vector_norm(x.double().cpu() @ s[m - b :, want], dim=0)
        done = m >= k and bool((est <= 0.5 * tol * theta[want].abs()).all())
        if done or m >= n or products + p > max_iter:
            break
        new = _orthonormal_columns(x, q, scale)
        if new.shape[1] == 0:  # invariant subspace: extend with random directions
            new = fresh(q)
        new = new[:, : max(1, min(p, n - m))]
    y = q @ s[:, want].to(q.dtype)  # (n, k) Ritz vectors
    y = y / torch.linalg.vector_norm(y, dim=0)
    ay = op @ y
    res = EigenResult(iterations=products + k, which=which)
    for j, i in enumerate(want.tolist()):
        lam = float(theta[i])
        r = relative_residual(ay[:, j], y[:, j], lam)
        res.values.append(lam)
        res.vectors.append(y[:, j])
        res.residuals.append(r)
        res.converged.append(r <= tol)
    return res
