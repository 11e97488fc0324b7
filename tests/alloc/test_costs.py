"""Cost models by hand: size, BOPs, average bits, INT4 share, latency tables, GEMM shapes."""

from __future__ import annotations

import numpy as np
import pytest

from hawq.alloc import Candidate, LatencyTable, OpCost, cost_arrays
from hawq.alloc.costs import op_shapes
from hawq.errors import HawqError
from hawq.io import write_json

from .cases import tiny_vit

LIN = OpCost("fc", "linear", params=1000, macs=64_000, shape="linear:64x100x10")
MM = OpCost("qk", "matmul", params=0, macs=16_000, shape="matmul:256x16x64")
W4A8, W8A4, W8A8, FP = Candidate(4, 8), Candidate(8, 4), Candidate(8, 8), Candidate(None, None)


def test_costs_by_hand():
    mm4 = Candidate(4, 4).for_kind("matmul")
    c = cost_arrays([LIN, MM], [[W4A8, W8A8, FP], [mm4, Candidate(8, 8).for_kind("matmul")]])
    assert list(c["size_mb"][0]) == pytest.approx([1000 * 4 / 8 / 2**20, 1000 / 2**20,
                                                   1000 * 4 / 2**20])  # fmt: skip
    assert list(c["size_mb"][1]) == [0.0, 0.0]
    assert list(c["bops"][0]) == pytest.approx([64_000 * 32e-9, 64_000 * 64e-9, 64_000 * 1024e-9])
    assert list(c["bops"][1]) == pytest.approx([16_000 * 16e-9, 16_000 * 64e-9])
    # share of MACs with both operands <= 4 bits: only the matmul at a4 qualifies
    assert list(c["int4_share"][0]) == [0.0, 0.0, 0.0]
    assert list(c["int4_share"][1]) == pytest.approx([16 / 80, 0.0])
    # avg bits weighted by MACs: (w + a) / 2 for linear, a for matmul
    assert list(c["avg_bits"][0]) == pytest.approx([0.8 * 6, 0.8 * 8, 0.8 * 32])
    assert list(c["avg_bits"][1]) == pytest.approx([0.2 * 4, 0.2 * 8])


def test_avg_bits_by_params_is_weight_bits_per_parameter():
    other = OpCost("fc2", "linear", params=3000, macs=1)
    c = cost_arrays([LIN, other, MM], [[W4A8], [W8A4], [Candidate(2, 2)]], avg_bits_by="params")
    total = sum(float(a[0]) for a in c["avg_bits"])
    assert total == pytest.approx((1000 * 4 + 3000 * 8) / 4000)


def test_latency_table_by_op_then_by_shape(tmp_path):
    path = write_json(tmp_path / "lat.json", {"unit": "us", "by_op": {"fc": {"w4a8": 3.0}},
                      "by_shape": {"linear:64x100x10": {"w4a8": 9.0, "w8a8": 5.0},
                                   "matmul:256x16x64": {"a8": 1.0, "w8a8": 2.0}}})  # fmt: skip
    t = LatencyTable.load(path)
    c = cost_arrays([LIN, MM], [[W4A8, W8A8], [Candidate(8, 8).for_kind("matmul")]], t)
    assert list(c["latency_us"][0]) == [3.0, 5.0]  # by_op wins, then the shape row
    assert list(c["latency_us"][1]) == [2.0]
    with pytest.raises(HawqError, match="no latency for op fc .* at setting wfpafp"):
        cost_arrays([LIN], [[FP]], t)
    write_json(tmp_path / "bad.json", {"rows": []})
    with pytest.raises(HawqError, match="not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_gemm_shapes_of_the_tiny_vit():
    shapes = op_shapes(tiny_vit(), (3, 32, 32))
    assert shapes["patch_embed"] == "linear:64x48x64"  # 64 patches of 4*4*3 -> dim 64
    assert shapes["blocks.0.attn.qkv"] == "linear:65x64x192"
    assert shapes["blocks.0.attn.qk"] == "matmul:260x16x65"  # 4 heads x 65 tokens, head dim 16
    assert shapes["blocks.0.attn.av"] == "matmul:260x65x16"
    assert shapes["head"] == "linear:1x64x10"


def test_candidate_keys_and_matmul_canonical_form():
    assert Candidate(4, 8).key == "w4a8"
    assert Candidate(4, 8, w_format="nf4").key == "w4nf4a8"
    assert Candidate(None, 8).key == "wfpa8"
    assert Candidate(4, 8).for_kind("matmul") == Candidate(8, 8)
    assert Candidate(4, 8).operand_bits("matmul") == (8, 8)
    assert np.isclose(Candidate(None, 4).max_bits("linear"), 32)
    with pytest.raises(HawqError, match="w_bits=9 is invalid"):
        Candidate(9, 4)
    with pytest.raises(HawqError, match="unknown key"):
        Candidate.parse({"w_bits": 4, "a_bit": 4})
