"""The worked example of experiments/own_model: a model and a data set that live outside
hawq (put on PYTHONPATH) through ``python -m hawq.run model=custom data=custom`` without
editing the package: train, evaluate, curvature, allocation and PTQ all run on the user's
ops, named from the user's module tree."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli

EXAMPLE = REPO / "experiments" / "own_model"


def test_own_model_and_data_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["bash", str(EXAMPLE / "run.sh"), f"paths.run_dir={tmp_path}", "device=cpu",
         "train.epochs=3", "data.datasets.n_train=1024", "data.datasets.n_test=512"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert res["evaluate"]["fp"]["acc"] > 40.0  # 4 classes: chance is 25
    bits = (tmp_path / "bits.yaml").read_text()
    for op in ("blocks.0.qk", "blocks.0.av", "blocks.0.einsum", "blocks.1.linear_1", "matmul"):
        assert f"{op}:" in bits, op  # functional products got bits, by readable names
    assert res["ptq"]["quantized"]["acc"] > 40.0


def test_custom_groups_fail_in_one_line_without_their_target(tmp_path):
    proc = run_cli("model=custom", f"paths.run_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model._target_" in proc.stderr.strip().splitlines()[-1]
    env_path = f"{EXAMPLE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "hawq.run", "model=custom", "model._target_=tokenmix.TokenMix",
         "data=custom", "data.datasets._target_=stripes.no_such_function",
         f"paths.run_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": env_path},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.datasets._target_" in proc.stderr.strip().splitlines()[-1]


def test_a_transformers_model_through_the_cli(tmp_path):
    """``model=custom model._target_=hf_vit.vit``: a ViTForImageClassification from a
    config, trained, curvature-ranked, allocated, quantized and run integer-only by the
    CLI (its ImageClassifierOutput read through .logits)."""
    import pytest

    pytest.importorskip("transformers")
    proc = subprocess.run(
        ["bash", str(EXAMPLE / "run.sh"), "model._target_=hf_vit.vit", f"paths.run_dir={tmp_path}",
         "device=cpu", "train.epochs=2", "data.datasets.n_train=512", "data.datasets.n_test=256",
         "hessian.max_samples=10", "stages=[train,evaluate,hessian,alloc,ptq,integer]",
         "integer.calib_batches=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())["stages"]
    bits = (tmp_path / "bits.yaml").read_text()
    assert "vit.layers.1.attention.qk:" in bits and "classifier:" in bits
    fp, q = res["ptq"]["fp"]["acc"], res["ptq"]["quantized"]["acc"]
    assert res["evaluate"]["fp"]["acc"] == fp and abs(q - fp) <= 10.0  # 2 epochs: barely trained
    assert res["integer"]["model"] == "IntegerGraph" and res["integer"]["agreement"] >= 80.0


@pytest.mark.slow  # ~100 s on 2 idle cores; tests/integer/test_graph_tokens.py is the fast one
def test_a_token_model_through_the_cli_to_integer_only_and_onnx(tmp_path):
    """``run_bert.sh``: a transformers BERT on token ids (``model.prepare.input_dtype=int64``)
    through every stage: its embeddings become integer lookups onto the residual stream, its
    pooler's tanh a table, and the exported ONNX runs every product on an integer kernel."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    proc = subprocess.run(
        ["bash", str(EXAMPLE / "run_bert.sh"), f"paths.run_dir={tmp_path}", "device=cpu",
         "train.epochs=4", "data.datasets.n_train=2048", "data.datasets.n_test=256",
         "hessian.max_samples=10", "quant.calib_batches=2", "integer.calib_batches=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())["stages"]
    bits = (tmp_path / "bits.yaml").read_text()
    for op in ("bert.encoder.layer.1.attention.self.qk", "bert.pooler.dense", "classifier"):
        assert f"{op}:" in bits, op
    hess = json.loads((tmp_path / "hessian.json").read_text())
    assert len(hess["ops"]) == 18  # 14 linears + qk and av of both layers: none skipped
    assert res["evaluate"]["fp"]["acc"] > 35.0  # 4 classes: chance is 25
    assert res["integer"]["model"] == "IntegerGraph" and res["integer"]["agreement"] >= 95.0
    assert res["integer"]["integer_only"] and res["integer"]["float_ops"] == []
    onnx = res["export"]["onnx"]
    assert onnx["ort_integer_ops"] == 18 and onnx["ort_argmax_agreement"] >= 99.0


def test_dict_samples_with_an_attention_mask_through_the_cli(tmp_path):
    """``PADDED=1 run_bert.sh``: samples ``({input_ids, attention_mask}, label)`` of padded
    sequences, the model called ``model(**inputs)`` (``model.prepare.inputs``): every stage
    runs on dict batches, and the mask is an input of the integer model and the ONNX file."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    proc = subprocess.run(
        ["bash", str(EXAMPLE / "run_bert.sh"), f"paths.run_dir={tmp_path}", "device=cpu",
         "train.epochs=2", "data.datasets.n_train=1024", "data.datasets.n_test=256",
         "hessian.max_samples=10", "quant.calib_batches=2", "integer.calib_batches=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PADDED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())["stages"]
    hess = json.loads((tmp_path / "hessian.json").read_text())
    assert len(hess["ops"]) == 18 and "bert.encoder.layer.1.attention.self.av" in hess["ops"]
    assert res["integer"]["integer_only"] and res["integer"]["float_ops"] == []
    assert res["integer"]["agreement"] >= 95.0
    onnx = res["export"]["onnx"]
    assert onnx["ort_integer_ops"] == 18 and onnx["ort_argmax_agreement"] >= 99.0
