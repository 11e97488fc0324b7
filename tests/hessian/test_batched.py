"""Vmapped products ``op @ V`` (one double backward for many columns) against the dense
Hessian, and probe chunking that leaves the estimates unchanged."""

from __future__ import annotations

import pytest
import torch

from hawq.hessian import block_traces
from hawq.hessian.dense import dense_hessian
from hawq.hessian.operator import HessianOperator

from .cases import CASES


@pytest.mark.parametrize("case_name", ["vit", "cnn", "mlp"])
def test_vmapped_products_match_dense(case_name):
    case = CASES[case_name]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    v = torch.randn(op.size, 21, dtype=torch.float64)  # > vmap_columns: two chunks
    got = op @ v
    assert op.vmap_columns == 16 and op.n_hvp == 21  # batched, every column counted
    assert torch.allclose(got, dense @ v, atol=1e-10)
    name, s = next(iter(op.blocks.items()))
    assert torch.allclose(op.block(name) @ v[s, :5], dense[s, s] @ v[s, :5], atol=1e-10)


def test_chunked_probes_give_the_same_estimates():
    case = CASES["vit"]()
    op = HessianOperator(case.model, case.loss_fn, case.batches)
    one = block_traces(op, max_samples=8, min_samples=8, sketch=5, chunk=1)
    four = block_traces(op, max_samples=8, min_samples=8, sketch=5, chunk=4)
    for k in one.blocks:
        assert four.blocks[k].mean == pytest.approx(one.blocks[k].mean, rel=1e-9, abs=1e-12)
        assert four.blocks[k].stderr == pytest.approx(one.blocks[k].stderr, rel=1e-6, abs=1e-12)
    assert four.n_products == one.n_products == 18
