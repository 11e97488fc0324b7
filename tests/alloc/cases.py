"""Small allocation instances and a tiny ViT with a synthetic ``hessian.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hawq.alloc import Candidate, Problem
from hawq.alloc.report import synthetic_report
from hawq.io import write_json
from hawq.models import ViT

SETTINGS = [Candidate(4, 4), Candidate(4, 8), Candidate(8, 4), Candidate(8, 8)]
TINY_VIT = dict(image_size=32, patch_size=4, in_chans=3, num_classes=10, dim=64, depth=2,
                heads=4, mlp_dim=128, dropout=0.0)  # fmt: skip  (= conf/model/vit_tiny.yaml)


def random_problem(rng: np.random.Generator, n_ops: int, ties: bool = False) -> Problem:
    """``n_ops`` ops with 3-4 candidates each, random sensitivities and integer-ish costs."""
    ks = [int(rng.integers(3, 5)) for _ in range(n_ops)]
    choices = [list(rng.permutation(SETTINGS))[:k] for k in ks]
    sens = [rng.random(k) * 10 ** rng.uniform(-3, 1) for k in ks]
    costs = {
        "bops": [rng.integers(1, 100, k).astype(float) for k in ks],
        "size_mb": [rng.random(k) for k in ks],
        "int4_share": [np.array([0.0 if c.max_bits("linear") > 4 else w for c in ch])
                       for ch, w in zip(choices, rng.dirichlet(np.ones(n_ops)), strict=True)],
    }  # fmt: skip
    groups = []
    if ties and n_ops >= 3:
        groups = [[f"op{i}" for i in rng.choice(n_ops, size=int(rng.integers(2, 4)),
                                                replace=False)]]  # fmt: skip
    return Problem([f"op{i}" for i in range(n_ops)], choices, sens, costs, groups)


def random_budgets(rng: np.random.Generator, p: Problem) -> dict[str, float]:
    """1-3 budgets drawn between each cost's min and max total (some infeasible)."""
    out = {}
    kinds = list(rng.permutation(["bops", "size_mb", "int4_share"]))[: int(rng.integers(1, 4))]
    for b in kinds:
        lo = sum(float(c.min()) for c in p.costs[b])
        hi = sum(float(c.max()) for c in p.costs[b])
        out[b] = float(rng.uniform(lo - 0.05 * (hi - lo), hi))
    return out


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(**TINY_VIT).eval()


def write_report(model: torch.nn.Module, path: Path, seed: int = 0) -> dict:
    """A synthetic (random curvature) ``hessian.json`` for ``model`` at ``path``."""
    report = synthetic_report(model, (3, 32, 32), seed)
    write_json(path, report)
    return report
