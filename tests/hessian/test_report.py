"""hessian.json: writer/reader round trip and one-line errors for bad files."""

from __future__ import annotations

import json

import pytest

from hawq.errors import HawqError
from hawq.hessian import load_hessian_report, write_hessian_report
from hawq.hessian.hutchinson import TraceEstimate
from hawq.hessian.power import EigenResult
from hawq.hessian.report import op_entry


def _report() -> dict:
    t = TraceEstimate(2.0, 0.1, 12, 30)
    e = EigenResult([1.5], [], [1e-5], 9)
    return {"schema": 1, "model": "m.M", "checkpoint": "/x/model.pt", "estimator": "hutchinson",
            "backend": "func", "seed": 0, "dtype": "float32", "batches": 1, "batch_size": 8,
            "wall_s": 1.0,
            "ops": {"fc": op_entry("linear", 30, 100, t, e, {"x": TraceEstimate(0.5, 0.01, 12, 5)}),
                    "mm": op_entry("matmul", 0, 50, None, None,
                                   {"a": TraceEstimate(1.0, float("inf"), 1, 4),
                                    "b": TraceEstimate(2.0, 0.0, 12, 4)})}}  # fmt: skip


def test_round_trip(tmp_path):
    path = write_hessian_report(tmp_path / "hessian.json", _report())
    rep = load_hessian_report(path)
    assert list(rep["ops"]) == ["fc", "mm"]
    fc, mm = rep["ops"]["fc"], rep["ops"]["mm"]
    assert (fc["trace"], fc["trace_stderr"], fc["trace_samples"]) == (2.0, 0.1, 12)
    assert fc["eigenvalues"] == [1.5] and fc["eig_iterations"] == 9
    assert fc["act_trace"] == {"x": 0.5} and fc["act_numel"] == {"x": 5}
    assert mm["trace"] is None and mm["act_trace_stderr"] == {"a": None, "b": 0.0}


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(HawqError, match="missing Hessian report"):
        load_hessian_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HawqError, match="cannot read JSON"):
        load_hessian_report(bad)
    rep = _report()
    rep["ops"]["mm"]["act_trace"] = {"x": 1.0}
    bad.write_text(json.dumps(rep))
    with pytest.raises(HawqError, match="act_trace keys"):
        load_hessian_report(bad)
    rep = _report()
    del rep["ops"]["fc"]["trace"]
    bad.write_text(json.dumps(rep))
    with pytest.raises(HawqError, match="lacks 'trace'"):
        load_hessian_report(bad)
    with pytest.raises(HawqError, match="schema"):
        write_hessian_report(tmp_path / "h.json", {**_report(), "schema": 2})
    assert not (tmp_path / "h.json").exists()


def test_public_path_from_library_traces_to_an_allocation(tmp_path):
    """layer_traces + activation_traces + op_inventory -> curvature_report -> allocate:
    no hessian.json assembled by hand, no private helper."""
    import torch
    from torch import nn

    from hawq.alloc import allocate, parse_hessian
    from hawq.hessian.api import activation_traces, layer_traces
    from hawq.hessian.report import curvature_report, load_hessian_report, write_hessian_report
    from hawq.models import ViT
    from hawq.models.ops import op_inventory

    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=24,
                dropout=0.0).eval()  # fmt: skip
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))]
    loss = nn.CrossEntropyLoss()
    traces = layer_traces(model, loss, batches, max_samples=12, min_samples=4)
    acts = activation_traces(model, loss, batches, max_samples=12, min_samples=4)
    report = curvature_report(op_inventory(model, (3, 8, 8)), traces, acts, batch_size=8)
    assert set(report["ops"]) == {i.name for i in op_inventory(model, (3, 8, 8))}
    path = write_hessian_report(tmp_path / "hessian.json", report)
    assert load_hessian_report(path)["ops"].keys() == report["ops"].keys()
    cands = [{"w_bits": 4, "a_bits": 4}, {"w_bits": 8, "a_bits": 8}]
    alloc = allocate(parse_hessian(report), cands, "hawq_v3", {"int4_share": 0.5},
                     model=model, input_size=(3, 8, 8))  # fmt: skip
    assert set(alloc.plan.ops) <= set(report["ops"]) and alloc.solution.totals["int4_share"] >= 0.5
