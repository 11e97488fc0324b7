"""Top-k eigenpairs by power iteration with deflation.

For a symmetric operator :math:`A` (anything with ``@``, ``shape``, ``dtype``,
``device``), eigenpair :math:`j` is found by iterating

.. math::  w \\leftarrow P_j A v, \\quad v \\leftarrow w / \\lVert w \\rVert,
           \\qquad P_j = I - \\sum_{i<j} u_i u_i^\\top ,

i.e. power iteration restricted to the orthogonal complement of the pairs
already found (projection deflation). It converges to the eigenvalue of largest
*magnitude* in that complement at rate :math:`|\\lambda_{j+1}/\\lambda_j|`. The
Rayleigh quotient :math:`\\lambda = v^\\top A v` is the estimate; iteration
stops when the relative residual

.. math::  r = \\lVert A v - \\lambda v \\rVert / |\\lambda|

is below ``tol`` (the eigenvalue error is then about :math:`r^2 |\\lambda| /
\\text{gap}`) or after ``max_iter`` products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EigenResult:
    """Eigenpairs of largest magnitude, in order of decreasing magnitude.

    Attributes:
        values: eigenvalue estimates.
        vectors: unit eigenvector estimates (flat tensors).
        residuals: :math:`\\lVert A v - \\lambda v \\rVert / |\\lambda|` per pair.
        iterations: operator products used in total.
    """

    values: list[float] = field(default_factory=list)
    vectors: list[torch.Tensor] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    iterations: int = 0


def relative_residual(av: torch.Tensor, v: torch.Tensor, lam: float) -> float:
    """:math:`\\lVert A v - \\lambda v \\rVert / |\\lambda|` (``inf`` when :math:`\\lambda = 0`
    and :math:`A v \\neq 0`, 0 when both vanish)."""
    r = float(torch.linalg.vector_norm(av - lam * v))
    if lam == 0.0:
        return 0.0 if r == 0.0 else float("inf")
    return r / abs(lam)


def _project(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - torch.dot(u, v) * u
    return v


def power_iteration(
    op: Any, top_k: int = 1, tol: float = 1e-4, max_iter: int = 200, seed: int = 0
) -> EigenResult:
    """Top-``top_k`` eigenpairs (by magnitude) of symmetric ``op``.

    Args:
        op: symmetric operator with ``@``, ``shape``, ``dtype``, ``device``.
        top_k: pairs to find (capped at the dimension).
        tol: stop a pair when its relative residual is below this.
        max_iter: products per pair at most.
        seed: start vectors are Gaussian from this seed.
    """
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    res = EigenResult()
    for _ in range(min(top_k, n)):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        v = _project(v, res.vectors)
        v = v / torch.linalg.vector_norm(v)
        lam, r = 0.0, float("inf")
        for it in range(max_iter):
            av = _project(op @ v, res.vectors)
            res.iterations += 1
            lam = float(torch.dot(v, av))
            r = relative_residual(av, v, lam)
            norm = torch.linalg.vector_norm(av)
            if r <= tol or norm == 0 or it == max_iter - 1:
                break  # (lam, r) belong to the current v
            v = av / norm
        res.values.append(lam)
        res.vectors.append(v)
        res.residuals.append(r)
    return res
