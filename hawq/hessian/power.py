"""Top-k eigenpairs by power iteration with deflation, and the shared :class:`EigenResult`.

For a symmetric operator :math:`A` (anything with ``@``, ``shape``, ``dtype``,
``device``), eigenpair :math:`j` is found by iterating

.. math::  w \\leftarrow P_j (A - \\sigma I) v, \\quad v \\leftarrow w / \\lVert w \\rVert,
           \\qquad P_j = I - \\sum_{i<j} u_i u_i^\\top ,

i.e. power iteration restricted to the orthogonal complement of the pairs
already found (projection deflation). With :math:`\\sigma = 0` it converges to
the eigenvalue of largest *magnitude* in that complement (``which="LM"``) at
rate :math:`|\\lambda_{j+1}/\\lambda_j|`. For the largest *algebraic* eigenvalue
(``which="LA"``, :math:`\\lambda_{\\max}`): when the dominant value found is
negative, :math:`\\lambda_{\\max}` lies above it and iteration restarts on the
shifted operator :math:`A - \\sigma I` with :math:`\\sigma` that dominant value,
which is positive semi-definite on the complement with top eigenvalue
:math:`\\lambda_{\\max} - \\sigma`. The estimate is the Rayleigh quotient
:math:`\\lambda = v^\\top A v`; iteration stops when the *true* relative residual
of :math:`A` itself (not of the deflated operator)

.. math::  r = \\lVert A v - \\lambda v \\rVert / |\\lambda|

is at most ``tol`` (the eigenvalue error is then about :math:`r^2 |\\lambda| /
\\text{gap}`) or after ``max_iter`` products; ``converged`` records which. (A
deflated pair stops on the residual of the deflated operator; a final
Rayleigh-Ritz step on the span of all found vectors removes the mixing an
earlier pair's error leaves in it, and the residuals reported are those of
:math:`A`.) Power
iteration cannot converge on an opposite-sign tie :math:`\\pm\\lambda` (the
iterate oscillates) and is slow on small gaps: such pairs come back with
``converged = False``; use Lanczos (:mod:`hawq.hessian.lanczos`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("hawq")
WHICH = ("LA", "LM")  # largest algebraic (lambda_max) | largest magnitude


@dataclass
class EigenResult:
    """Eigenpairs in the order ``which`` names: largest algebraic first (``LA``) or largest
    magnitude first (``LM``).

    Attributes:
        values: eigenvalue estimates.
        vectors: unit eigenvector estimates (flat tensors).
        residuals: true :math:`\\lVert A v - \\lambda v \\rVert / |\\lambda|` per pair.
        iterations: operator products used in total.
        converged: per pair, residual <= the requested tolerance.
        which: ``LA`` or ``LM``.
    """

    values: list[float] = field(default_factory=list)
    vectors: list[torch.Tensor] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: list[bool] = field(default_factory=list)
    which: str = "LM"


def relative_residual(av: torch.Tensor, v: torch.Tensor, lam: float) -> float:
    """:math:`\\lVert A v - \\lambda v \\rVert / |\\lambda|` (``inf`` when :math:`\\lambda = 0`
    and :math:`A v \\neq 0`, 0 when both vanish)."""
    r = float(torch.linalg.vector_norm(av - lam * v))
    if lam == 0.0:
        return 0.0 if r == 0.0 else float("inf")
    return r / abs(lam)


def check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"unknown eigenvalue order {which!r}; allowed: {', '.join(WHICH)}")


def warn_unconverged(name: str, res: EigenResult, tol: float) -> None:
    """Log a warning naming the pairs of ``res`` whose residual exceeds ``tol``."""
    bad = [i for i, c in enumerate(res.converged) if not c]
    if bad:
        log.warning(
            "hessian: op %s: eigenpair(s) %s not converged (residuals %s > tol %.1e "
            "after %d products); raise max_iter",
            name,
            bad,
            [f"{res.residuals[i]:.1e}" for i in bad],
            tol,
            res.iterations,
        )


def _project(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - torch.dot(u, v) * u
    return v


def _power(
    op: Any, found: list[torch.Tensor], v: torch.Tensor, shift: float, tol: float, max_iter: int
) -> tuple[float, torch.Tensor, float, int]:
    """Power iteration on :math:`P(A - \\sigma I)P`: ``(lam, v, true residual, products)``."""
    lam, r, it = 0.0, float("inf"), 0
    for it in range(1, max_iter + 1):
        av = op @ v
        lam = float(torch.dot(v, av))
        r = relative_residual(av, v, lam)  # of A itself, not the deflated operator
        pav = _project(av, found)
        # stop on the deflated residual: the true one is floored by the earlier pairs'
        # errors until the final Rayleigh-Ritz step removes that mixing
        r_defl = relative_residual(pav, v, lam)
        w = pav - shift * v
        norm = torch.linalg.vector_norm(w)
        if r_defl <= tol or norm == 0 or it == max_iter:
            break  # (lam, r) belong to the current v
        v = w / norm
    return lam, v, r, it


def power_iteration(
    op: Any,
    top_k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    which: str = "LM",
) -> EigenResult:
    """Top-``top_k`` eigenpairs of symmetric ``op`` in the order ``which``.

    Args:
        op: symmetric operator with ``@``, ``shape``, ``dtype``, ``device``.
        top_k: pairs to find (capped at the dimension).
        tol: stop a pair when its true relative residual is at most this.
        max_iter: products per pair at most.
        seed: start vectors are Gaussian from this seed.
        which: ``LM`` (largest magnitude) or ``LA`` (largest algebraic).
    """
    check_which(which)
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    res = EigenResult(which=which)
    for _ in range(min(top_k, n)):
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        v0 = _project(v0, res.vectors)
        v0 = v0 / torch.linalg.vector_norm(v0)
        lam, v, r, used = _power(op, res.vectors, v0, 0.0, tol, max_iter)
        res.iterations += used
        if which == "LA" and lam < 0 and used < max_iter:
            # lambda_max lies above the dominant (negative) value: iterate on A - lam I
            lam, v, r, more = _power(op, res.vectors, v0, lam, tol, max_iter - used)
            res.iterations += more
        res.values.append(lam)
        res.vectors.append(v)
        res.residuals.append(r)
        res.converged.append(r <= tol)
    if len(res.vectors) >= 2:
        _rayleigh_ritz(op, res, tol)
    return res


def _rayleigh_ritz(op: Any, res: EigenResult, tol: float) -> None:
    """Rayleigh-Ritz on the span of the deflated vectors (``k`` products): removes the mixing
    that an earlier pair's error leaves in the later ones (a later pair's true residual is
    otherwise floored by the earlier pairs' accuracy); residuals come from the same products."""
    v = torch.stack(res.vectors, dim=1)  # (n, k)
    av = op @ v
    res.iterations += v.shape[1]
    theta, s = torch.linalg.eigh(0.5 * (v.T @ av + av.T @ v).double().cpu())
    key = theta if res.which == "LA" else theta.abs()
    idx = torch.argsort(key, descending=True).tolist()
    s = s.to(v.dtype).to(v.device)
    y, ay = v @ s, av @ s
    res.values = [float(theta[i]) for i in idx]
    res.vectors = [y[:, i] for i in idx]
    res.residuals = [relative_residual(ay[:, i], y[:, i], float(theta[i])) for i in idx]
    res.converged = [r <= tol for r in res.residuals]
