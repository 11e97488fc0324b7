"""What the engine accepts: one-shot generators, train-mode models (never mutated), zero blocks.

Oracles: the same quantities from a list of batches / an eval-mode model, dense Hessians,
and bit-for-bit copies of every parameter and buffer taken before the call.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hawq.hessian import (
    activation_traces,
    hessian_operator,
    layer_eigenvalues,
    layer_traces,
    spectral_density,
)
from hawq.hessian.dense import dense_hessian
from hawq.hessian.operator import HessianOperator
from hawq.models import ViT

from .cases import CASES


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_shot_generator_gives_the_list_result(caplog):
    case = CASES["mlp"](n_batches=3)
    kw = dict(seed=4, max_samples=5, min_samples=5, backend="double_backward", sketch=3)
    want = layer_traces(case.model, case.loss_fn, case.batches, **kw)
    with caplog.at_level(logging.INFO, logger="hawq"):
        got = layer_traces(case.model, case.loss_fn, (b for b in case.batches), **kw)
    assert "one-shot iterator" in caplog.text
    for name in want:
        assert got[name].mean == pytest.approx(want[name].mean, rel=1e-12)
        assert torch.isfinite(torch.tensor(got[name].mean))
    op = HessianOperator(case.model, case.loss_fn, iter(case.batches))
    dense = dense_hessian(case.model, case.loss_fn, case.batches, op.params)
    v = torch.randn(op.size, dtype=torch.float64)
    for _ in range(2):  # every product sees every batch
        assert torch.allclose(op @ v, dense @ v, atol=1e-12)
    eig = layer_eigenvalues(case.model, case.loss_fn, (b for b in case.batches), tol=1e-8)
    assert eig == layer_eigenvalues(case.model, case.loss_fn, case.batches, tol=1e-8)
    acts_gen = activation_traces(case.model, case.loss_fn, (b for b in case.batches),
                                 max_samples=3, min_samples=3)  # fmt: skip
    acts = activation_traces(case.model, case.loss_fn, case.batches, max_samples=3, min_samples=3)
    assert acts_gen["2"]["x"].mean == pytest.approx(acts["2"]["x"].mean, rel=1e-12)


def test_empty_batches_is_a_clear_error():
    from hawq.errors import HawqError

    case = CASES["mlp"]()
    with pytest.raises(HawqError, match="no batches"):
        HessianOperator(case.model, case.loss_fn, iter([]))


def _train_mode_models():
    cnn = CASES["cnn"]()  # BatchNorm with non-trivial running statistics
    gen = torch.Generator().manual_seed(0)
    vit = ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=8, num_classes=10,
              dropout=0.3).double()  # dropout active in train mode  # fmt: skip
    vit_batches = [(torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64),
                    torch.randint(0, 10, (3,), generator=gen))]  # fmt: skip
    return [(cnn.model, cnn.loss_fn, cnn.batches), (vit, nn.CrossEntropyLoss(), vit_batches)]


@pytest.mark.parametrize("index", [0, 1])
def test_train_mode_model_is_analysed_in_eval_mode_and_never_mutated(index, caplog):
    model, loss_fn, batches = _train_mode_models()[index]
    model.eval()
    ref_op = HessianOperator(model, loss_fn, batches)
    dense = dense_hessian(model, loss_fn, batches, ref_op.params)  # the eval-mode oracle

    def everything() -> tuple:
        tr = {b: layer_traces(model, loss_fn, batches, max_samples=3, min_samples=2, sketch=3,
                              backend=b) for b in ("double_backward", "func")}  # fmt: skip
        eig = layer_eigenvalues(model, loss_fn, batches, tol=1e-6, max_iter=30)
        act = activation_traces(model, loss_fn, batches, max_samples=2, min_samples=2)
        dens = spectral_density(model, loss_fn, batches, steps=4)[""]
        return ({b: {k: e.mean for k, e in t.items()} for b, t in tr.items()}, eig,
                {k: {o: e.mean for o, e in d.items()} for k, d in act.items()},
                dens.nodes.tolist())  # fmt: skip

    want = everything()
    model.train()
    before = _state(model)
    with caplog.at_level(logging.WARNING, logger="hawq"):
        op, why = hessian_operator(model, loss_fn, batches, backend="auto")  # a trial product
        assert op.backend == "double_backward" and why == "auto: double backward runs"
        v = torch.randn(op.size, dtype=torch.float64)
        assert torch.allclose(op @ v, dense @ v, atol=1e-10)
        got = everything()
    assert "train mode" in caplog.text
    assert _same(before, _state(model))  # parameters AND buffers bit for bit
    assert model.training and all(m.training for m in model.modules())  # mode restored
    for g, w in zip(got, want):  # the same numbers as in eval mode
        assert _close(g, w)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_close(a[k], b[k]) for k in a)
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return True


def test_zero_diagonal_block_traces_are_consistent_with_zero():
    """A zero head makes the first layer's diagonal block exactly 0 (its cross blocks are
    not): the all-ops estimate is finite, consistent with 0 and flagged sign-undetermined
    or exactly 0, never a crash or NaN."""
    case = CASES["mlp"]()
    with torch.no_grad():
        case.model[2].weight.zero_()
    for est in ("sandwich", "hutchpp", "hutchinson"):
        tr = layer_traces(case.model, case.loss_fn, case.batches, max_samples=50, sketch=4,
                          backend="double_backward", estimator=est)["0"]  # fmt: skip
        assert abs(tr.mean) <= 4 * tr.stderr or tr.mean == tr.stderr == 0.0, (est, tr)
