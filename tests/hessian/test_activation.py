"""Activation curvature vs a dense oracle on the tiny ViT and CNN."""

from __future__ import annotations

import pytest
import torch

from hawq.hessian import activation_traces
from hawq.hessian.activation import ActivationHessian
from hawq.hessian.dense import dense_activation_hessian
from hawq.models import MatMul, quantizable_ops

from .cases import CASES

OPERAND_INDEX = {"x": 0, "a": 0, "b": 1}


@pytest.fixture(scope="module", params=["vit", "cnn"])
def dense_act(request):
    case = CASES[request.param](n_batches=1, batch=2 if request.param == "vit" else 1)
    ops = quantizable_ops(case.model)
    act = ActivationHessian(case.model, case.loss_fn, case.batches)
    dense = {(n, o): dense_activation_hessian(case.model, case.loss_fn, case.batches[0], ops[n],
                                              OPERAND_INDEX[o]) for n, o in act.keys}  # fmt: skip
    return case, act, dense


def test_operands_are_every_op_input(dense_act):
    case, act, _ = dense_act
    ops = quantizable_ops(case.model)
    expect = [(n, o) for n, m in ops.items()
              for o in (("a", "b") if isinstance(m, MatMul) else ("x",))]  # fmt: skip
    assert act.keys == expect


def test_operand_hvp_matches_dense(dense_act):
    case, act, dense = dense_act
    graph = act._graph(*act.local[0])
    for key, h in dense.items():
        t = graph.taps[key][0]
        v = torch.randn_like(t)
        got = graph.hvp({key: [v]})[key][0].reshape(-1)
        want = h @ v.reshape(-1)
        assert float((got - want).norm()) <= 1e-10 * float(want.norm()) + 1e-14, key
        assert act.numel[key] == t.numel() // len(case.batches[0][1])


def test_activation_traces_within_3_stderr(dense_act):
    case, _, dense = dense_act
    if case.name == "cnn":
        pytest.skip("the estimator is covered on the ViT; the CNN's operand HVPs are tested")
    res = activation_traces(case.model, case.loss_fn, case.batches, rtol=1e-9, max_samples=100)
    for (name, operand), h in dense.items():
        est = res[name][operand]
        exact = float(h.trace())  # Hessian of the batch-mean loss: already per sample
        assert est.n_samples == 100
        assert abs(est.mean - exact) <= 3 * est.stderr + 1e-12, (name, operand, est, exact)


def test_multi_batch_average_is_sample_weighted():
    case = CASES["mlp"](n_batches=2, batch=3)
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    ops = quantizable_ops(case.model)
    res = activation_traces(case.model, case.loss_fn, case.batches, rtol=1e-9, max_samples=200)
    for name in ops:
        exact = float(dense_activation_hessian(case.model, case.loss_fn, (x, y), ops[name]).trace())
        est = res[name]["x"]
        assert abs(est.mean - exact) <= 3 * est.stderr + 1e-12, name
