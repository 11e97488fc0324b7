"""The latency table: op shapes, the kernel each setting runs, the JSON the allocator reads."""

from __future__ import annotations

import pytest
import torch

from hawq.alloc import Candidate, LatencyTable, OpCost, cost_arrays
from hawq.alloc.candidates import op_candidates
from hawq.alloc.costs import op_shapes as gemm_keys
from hawq.errors import HawqError
from hawq.integer import ops as int_ops
from hawq.integer.latency import kernel, measure_latency, op_shapes, write_latency_table
from hawq.models import ResNet, ViT, quantizable_ops
from hawq.models.ops import op_inventory

CANDS = [Candidate(4, 4), Candidate(4, 8), Candidate(8, 8), Candidate(None, None)]
CPU = torch.device("cpu")


def tiny_vit() -> ViT:
    return ViT(dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.0).eval()


@pytest.mark.parametrize("model", [tiny_vit(), ResNet(depth=8, width=8)], ids=["vit", "resnet"])
def test_every_op_has_a_shape_and_the_keys_are_the_allocators(model):
    shapes = op_shapes(model, (3, 32, 32))
    assert list(shapes) == list(quantizable_ops(model))
    assert {n: s.key for n, s in shapes.items()} == gemm_keys(model, (3, 32, 32))


@pytest.mark.parametrize("model", [tiny_vit(), ResNet(depth=8, width=8)], ids=["vit", "resnet"])
def test_each_kernel_computes_the_ops_product_at_its_precision(model):
    """Every (op, setting) kernel returns the op's output shape: int8 codes after the
    requant epilogue for integer settings, floats for FP."""
    out_shapes = {}

    def record(name, m, inputs, output):
        out_shapes.setdefault(name, tuple(output.shape))

    from hawq.models.ops import probe_ops

    probe_ops(model, record, (3, 32, 32), batch=2)
    for name, op in op_shapes(model, (3, 32, 32)).items():
        for c in op_candidates(op.kind, CANDS):
            y = kernel(op, c, 2, CPU)()
            assert tuple(y.shape) == out_shapes[name], (name, c.key)
            assert y.dtype == (torch.float32 if c.a_bits is None else torch.int8), (name, c.key)


def test_table_feeds_the_allocators_latency_cost(tmp_path):
    model = tiny_vit()
    seen = []
    table = measure_latency(model, CANDS, batch=4, iters=2, warmup=1, progress=seen.append)
    assert table["unit"] == "us" and table["per"] == "image"
    # the backend that ran (auto resolved), the CPU and the kernels: a table is per machine
    assert table["backend"] == int_ops.resolve(torch.zeros(1, dtype=torch.int8))
    assert table["kernels"]["resolved"] == table["backend"]
    assert table["kernels"]["isa"]["families"] is not None
    assert seen == list(table["by_shape"])  # one timing pass per distinct shape
    assert len(table["by_shape"]) < len(table["ops"])  # blocks' repeated shapes timed once
    for row in table["by_shape"].values():
        assert row and all(us > 0 for us in row.values())
    loaded = LatencyTable.load(write_latency_table(table, tmp_path / "lat.json"))
    keys = gemm_keys(model, (3, 32, 32))
    ops = [OpCost(i.name, i.kind, i.params, i.macs, keys[i.name]) for i in op_inventory(model)]
    cands = [op_candidates(op.kind, CANDS) for op in ops]
    lat = cost_arrays(ops, cands, loaded)["latency_us"]
    for op, cs, row in zip(ops, cands, lat, strict=True):
        shape = table["by_shape"][table["ops"][op.name]]
        assert list(row) == [shape[c.key] for c in cs]


def test_float_formats_and_bad_options_are_one_line_errors():
    op = next(iter(op_shapes(tiny_vit(), (3, 32, 32)).values()))
    with pytest.raises(HawqError, match="no latency kernel for setting w4nf4a8"):
        kernel(op, Candidate(4, 8, w_format="nf4"), 2, CPU)
    with pytest.raises(HawqError, match="must be >= 1"):
        measure_latency(tiny_vit(), CANDS, batch=0)
