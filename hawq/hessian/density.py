"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric :math:`A \\in \\mathbb R^{n \\times n}` with
eigenvalues :math:`\\lambda_i`, smoothed by a Gaussian of width
:math:`\\sigma`, is

.. math::  \\phi_\\sigma(t) = \\frac 1n \\sum_i g_\\sigma(t - \\lambda_i)
           = \\frac 1n \\mathrm{tr}\\, g_\\sigma(tI - A)
           \\approx \\frac{1}{n_v} \\sum_{j=1}^{n_v} v_j^\\top g_\\sigma(tI - A) v_j

with unit-norm random :math:`v_j` (scaled so :math:`\\mathbb E[v v^\\top] = I/n`).
Each quadratic form is computed by Gauss quadrature from ``steps`` Lanczos
steps started at :math:`v_j`: if :math:`T_m = S \\Theta S^\\top` then
:math:`v^\\top f(A) v \\approx \\sum_k \\tau_k f(\\theta_k)`, :math:`\\tau_k = s_{1k}^2`.
So the density is a mixture of Gaussians at the Ritz values :math:`\\theta_k`
with weights :math:`\\tau_k / n_v` (Ghorbani et al. 2019; Yao et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hawq.hessian.lanczos import lanczos_tridiag


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights of an SLQ estimate.

    Attributes:
        nodes: Ritz values of every run, concatenated (float64).
        weights: matching weights; they sum to 1.
        n_vectors: SLQ runs.
        steps: Lanczos steps per run (at most).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_vectors: int
    steps: int

    def evaluate(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """:math:`\\phi_\\sigma` on ``grid``; ``sigma`` defaults to 1% of the node range."""
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = max(0.01 * span, 1e-12)
        z = (grid.double()[:, None] - self.nodes[None, :]) / sigma
        kernel = torch.exp(-0.5 * z**2) / (sigma * (2 * torch.pi) ** 0.5)
        return kernel @ self.weights

    def as_dict(self) -> dict:
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "n_vectors": self.n_vectors,
            "steps": self.steps,
        }


def slq(op: Any, n_vectors: int = 1, steps: int = 80, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature of symmetric ``op``.

    Args:
        op: operator with ``@``, ``shape``, ``dtype``, ``device``.
        n_vectors: independent start vectors (runs).
        steps: Lanczos steps per run (capped at the dimension); each one product.
        seed: start vectors are Gaussian from this seed.
    """
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_vectors):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        tri = lanczos_tridiag(op, v, steps)
        theta, s = tri.ritz()
        nodes.append(theta)
        weights.append(s[0] ** 2 / n_vectors)
    return SpectralDensity(torch.cat(nodes), torch.cat(weights), n_vectors, steps)
