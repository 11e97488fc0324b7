"""Stages integer + export in the pipeline (synthetic data, tiny ViT); standalone reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hawq.errors import HawqError
from hawq.integer.export import export
from hawq.integer.standalone import load
from hawq.pipeline import run_pipeline


def test_pipeline_ptq_integer_export(make_cfg, tmp_path):
    cfg = make_cfg("experiment=smoke", "train.epochs=1", "data.train_subset=256",
                   "data.test_subset=128", "data.batch_size=64", "data.eval_batch_size=128",
                   "quant.calib_batches=1", "quant.calib_batch_size=64",
                   "integer.calib_batches=1", "integer.calib_batch_size=64",
                   "stages=[train,ptq,integer,export]", "device=cpu")  # fmt: skip
    res = run_pipeline(cfg)["stages"]
    r = res["integer"]
    assert r["n"] == 128 and r["model"] == "IntegerGraph"
    assert r["agreement"] >= 90.0
    assert abs(r["fake_quant_acc"] - res["ptq"]["quantized"]["acc"]) < 1e-9
    run_dir = tmp_path / "run"
    doc = json.loads((run_dir / "export" / "integer.json").read_text())
    assert doc["nodes"][doc["ops"]["blocks.0.attn.qkv"]]["w_bits"] == 8
    # skipped when done; a missing source is one clear error
    again = run_pipeline(cfg)["stages"]["integer"]
    assert again == r
    cfg2 = make_cfg("experiment=smoke", "stages=[integer]", "device=cpu",
                    run_dir=tmp_path / "empty")  # fmt: skip
    with pytest.raises(HawqError, match="no quantized checkpoint"):
        run_pipeline(cfg2)


def test_standalone_reader_reproduces_a_layer(tmp_path):
    from hawq.integer.convert import convert
    from tests.integer.cases import fake_quant, tiny_vit

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    im = convert(fake_quant(tiny_vit(), x), [(x,)])
    export(im, tmp_path)
    ex = load(tmp_path)
    op = ex.op("blocks.0.mlp.fc1")
    assert op["kind"] == "linear" and op["w_bits"] == 8
    h = np.random.default_rng(0).integers(-128, 128, (5, op["k"])).astype(np.int64)
    acc = h @ op["weight"].astype(np.int64).T + op["bias"]  # int64, exact
    m, e, z = op["rq"]["m"], op["rq"]["e"], op["rq"]["z"]
    v = acc * m
    expect = (v + (1 << (e - 1)) - 1 + ((v >> e) & 1)) >> e  # round half even, e > 0
    expect = np.clip(expect + z, op["rq"]["lo"], op["rq"]["hi"])
    layer = im.steps.get_submodule(im.op_paths["blocks.0.mlp.fc1"])
    got = layer(torch.from_numpy(h).to(torch.int8))
    assert np.array_equal(got.numpy().astype(np.int64), expect)
    assert ex.formats["model"] == "IntegerGraph" and ex.formats["residual_scale"] == im.s_r
    steps = {g["name"]: g for g in ex.doc["graph"]}  # the dataflow by op name
    assert any(g.get("implements") == "blocks.0.mlp.fc1" for g in steps.values())


def test_own_model_runs_every_stage_to_an_integer_export(make_cfg, tmp_path):
    """A model hawq did not write (nn.TransformerEncoderLayer, model=torch_vit_tiny) from
    training to the integer-only export: the exported graph names the attention products
    it runs."""
    cfg = make_cfg("experiment=smoke", "model=torch_vit_tiny", "train.epochs=1",
                   "data.train_subset=256", "data.test_subset=128", "data.batch_size=64",
                   "quant.calib_batches=1", "integer.calib_batches=1",
                   "stages=[train,ptq,integer,export]", "device=cpu")  # fmt: skip
    res = run_pipeline(cfg)["stages"]  # W8A8 (no alloc: 4-bit grids magnify every rounding)
    assert res["integer"]["model"] == "IntegerGraph" and res["integer"]["agreement"] >= 90.0
    doc = json.loads((tmp_path / "run" / "export" / "integer.json").read_text())
    done = {g.get("implements") for g in doc["graph"]}
    assert {"encoder.layers.1.self_attn.qk", "encoder.layers.1.self_attn.av"} <= done
