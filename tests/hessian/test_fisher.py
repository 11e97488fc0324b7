"""Empirical Fisher traces (``hessian.method=fisher``) against brute force: one sample at a
time, its own backward pass, squared norms of the weight gradient and of every operand's
gradient, averaged; then the stage writes a ``hessian.json`` the allocator reads."""

import json

import pytest
import torch

from hawq.hessian.activation import tap_operands
from hawq.hessian.fisher import operand_fisher, weight_fisher
from hawq.models.ops import quantizable_ops

from .cases import cnn, vit


def _per_sample(case):
    """op -> mean ||grad_W l_i||^2 and (op, operand) -> mean ||d l_i / d x_i||^2, by looping."""
    model, loss_fn = case.model, case.loss_fn
    ops = quantizable_ops(model)
    w_vals, a_vals, n = {}, {}, 0
    for x, y in case.batches:
        for i in range(len(y)):
            taps = {}
            model.zero_grad()
            with tap_operands(ops, taps):
                loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            flat = [(k, t) for k, ts in taps.items() for t in ts]
            grads = torch.autograd.grad(loss, [t for _, t in flat], retain_graph=True,
                                        allow_unused=True)  # fmt: skip
            for (k, _), g in zip(flat, grads):
                a_vals[k] = a_vals.get(k, 0.0) + (0.0 if g is None else float(g.pow(2).sum()))
            loss.backward()
            for name, m in ops.items():
                if getattr(m, "weight", None) is not None and m.weight.grad is not None:
                    w_vals[name] = w_vals.get(name, 0.0) + float(m.weight.grad.pow(2).sum())
            n += 1
    return {k: v / n for k, v in w_vals.items()}, {k: v / n for k, v in a_vals.items()}


@pytest.mark.parametrize("make", [vit, cnn, lambda: vit(n_batches=2, batch=2)])
def test_fisher_traces_equal_the_per_sample_brute_force(make):
    case = make()
    weights, operands = _per_sample(case)
    got_w = weight_fisher(case.model, case.loss_fn, case.batches, chunk=3)
    got_a = operand_fisher(case.model, case.loss_fn, case.batches)
    assert set(got_w) == set(weights)
    for name, e in got_w.items():
        assert e.mean == pytest.approx(weights[name], rel=1e-9), name
        assert e.n_samples == sum(len(y) for _, y in case.batches) and e.stderr >= 0
    assert {(op, o) for op, d in got_a.items() for o in d} == set(operands)
    for (op, o), v in operands.items():
        assert got_a[op][o].mean == pytest.approx(v, rel=1e-9, abs=1e-300), (op, o)


def test_fisher_stage_writes_a_report_the_allocator_reads(make_cfg, tmp_path):
    from hawq.pipeline import run_pipeline

    res = run_pipeline(make_cfg("experiment=smoke", "data.train_subset=128",
                                "data.test_subset=64", "train.epochs=1",
                                "stages=[train,hessian,alloc]", "hessian.method=fisher",
                                "hessian.batch_size=16"))  # fmt: skip
    report = json.loads((tmp_path / "run" / "hessian.json").read_text())
    assert report["estimator"] == "fisher" and report["hvp_products"] == 0
    for name, e in report["ops"].items():
        assert e["act_trace"] and all(v >= 0 for v in e["act_trace"].values()), name
        if e["kind"] != "matmul":
            assert e["trace"] > 0 and e["trace_samples"] == 16 and e["eigenvalues"] is None
    assert res["stages"]["hessian"]["hvp_products"] == 0 and res["stages"]["alloc"]
