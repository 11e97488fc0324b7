"""``transformers`` models (5.x: decorated ``**kwargs`` forwards, attention through
``ALL_ATTENTION_FUNCTIONS``, masks built differently while tracing) through the whole
library: capture, curvature on dict batches against a dense Hessian, an allocation, PTQ,
QAT steps, reconstruction and ONNX export. Tiny random models built from configs."""

import pytest
import torch
import torch.nn.functional as F

from hawq.alloc.allocate import allocate
from hawq.alloc.report import parse_hessian
from hawq.errors import HawqError
from hawq.hessian import activation_traces, layer_traces
from hawq.hessian.dense import dense_activation_hessian
from hawq.hessian.fisher import operand_fisher, weight_fisher
from hawq.hessian.objective import BatchLoss
from hawq.hessian.report import curvature_report
from hawq.models.capture import prepare
from hawq.models.ops import op_inventory, quantizable_ops
from hawq.quant.api import calibrate, quantize_
from hawq.quant.plan import OpSetting, Plan

transformers = pytest.importorskip("transformers")

VOCAB, LABELS = 30, 3


def tiny_bert(layers: int = 2, hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=2 * hidden,
                                  max_position_embeddings=16, num_labels=LABELS)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32,
                                 num_labels=LABELS)  # fmt: skip
    return transformers.ViTForImageClassification(cfg).eval()


def tokens(n: int, t: int, seed: int = 0, pad: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad:
        mask[0, t - pad :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (n, t), generator=g), "attention_mask": mask}


def with_labels(batch: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(batch["input_ids"])
    return {**batch, "labels": torch.randint(0, LABELS, (n,), generator=g)}


#: the user's loss for dict batches: the logits of the inputs, against the labels
LOSS = BatchLoss(
    lambda model, b: F.cross_entropy(
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
    )
)


def test_bert_and_vit_are_fully_captured_with_readable_names():
    bert, report = prepare(tiny_bert(), tokens(2, 5), strict=True)
    assert report.share == 1.0 and not report.untraced
    for i in range(2):
        for role in ("query", "key", "value", "qk", "av"):
            assert f"bert.encoder.layer.{i}.attention.self.{role}" in report.ops
    vit, report = prepare(tiny_vit(), torch.randn(2, 3, 16, 16), strict=True)
    assert report.share == 1.0
    assert sum(n.endswith((".qk", ".av")) for n in report.ops) == 4


def _more_models() -> dict:
    """Tiny decoder, encoder-decoder and distilled models (caches off: a cache object is
    state, not an input to specialise on)."""
    T = transformers
    return {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(  # Conv1D: torch.addmm
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(  # rotary, GQA, RMSNorm
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
            max_position_embeddings=16)),  # nn.ReLU()(x) built inline
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(  # torch.finfo(x.dtype), bmm
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)),
    }  # fmt: skip


def test_swin_windows_and_patch_merging_are_fully_captured():
    """Window attention with shape arithmetic, tuples of sizes passed between modules."""
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                  num_heads=[1, 2], window_size=4, num_labels=LABELS)  # fmt: skip
    model = transformers.SwinForImageClassification(cfg).eval()
    prepared, report = prepare(model, torch.randn(2, 3, 32, 32), strict=True)
    assert report.share == 1.0 and not report.untraced
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(prepared(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "distilbert", "t5"])
def test_more_transformers_models_are_fully_captured(name):
    torch.manual_seed(0)
    model = _more_models()[name]().eval()

    def call(n, t, seed):
        batch = {**tokens(n, t, seed=seed, pad=1 if name != "gpt2" else 0), "use_cache": False}
        if name == "distilbert":
            batch.pop("use_cache")
        if name == "t5":
            batch["decoder_input_ids"] = batch["input_ids"][:, :3]
        return batch

    prepared, report = prepare(model, call(2, 6, 0), strict=True)
    assert report.share == 1.0 and not report.left_out
    batch = call(3, 5, 1)  # another batch size and length
    got, want = prepared(**batch), model(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


def test_prepared_bert_runs_other_shapes_and_padding_exactly():
    """Prepared on an unpadded (2, 5) batch, run on a padded (3, 7) one: transformers skips
    the mask eagerly for unpadded inputs but builds it while tracing, so the captured
    modules must be called as the traced graph calls them."""
    model = tiny_bert()
    prepared, _ = prepare(model, tokens(2, 5), strict=True)
    for batch in (tokens(3, 7, seed=1, pad=3), tokens(1, 4, seed=2)):
        torch.testing.assert_close(prepared(**batch).logits, model(**batch).logits,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_call_the_example_did_not_cover_is_one_clear_error():
    prepared, _ = prepare(tiny_bert(), tokens(2, 5), strict=True)
    batch = tokens(2, 5)
    with pytest.raises(HawqError, match="output_attentions"):
        prepared(**batch, output_attentions=True)  # would silently return no attentions
    with pytest.raises(HawqError, match="labels"):
        prepared(**with_labels(batch))
    with pytest.raises(HawqError, match="attention_mask"):
        prepared(input_ids=batch["input_ids"])


def test_curvature_on_dict_batches_equals_the_dense_hessian():
    model = tiny_bert(layers=1, hidden=4).double()
    prepared, _ = prepare(model, tokens(3, 4), strict=True)
    batch = with_labels(tokens(3, 4, seed=3, pad=1), seed=3)
    traces = layer_traces(prepared, LOSS, [batch], max_samples=100, min_samples=20, rtol=0.05,
                          sketch=16)  # fmt: skip
    name = "bert.encoder.layer.0.attention.self.query"
    w = prepared.get_submodule(name).weight
    params = dict(prepared.named_parameters())

    def loss_of(wv):
        state = {**params, f"{name}.weight": wv}
        return LOSS(lambda **kw: torch.func.functional_call(prepared, state, (), kw), batch)

    dense = torch.func.hessian(loss_of)(w.detach()).reshape(w.numel(), -1)
    exact, est = float(dense.diagonal().sum()), traces[name]
    assert abs(est.mean - exact) <= 4 * est.stderr + 1e-9 * abs(exact), (est, exact)

    acts = activation_traces(prepared, LOSS, [batch], rtol=1e-9, max_samples=200)
    qk = f"{name[: -len('query')]}qk"
    exact = float(dense_activation_hessian(prepared, LOSS, batch, prepared.get_submodule(qk),
                                           0).trace())  # fmt: skip
    est = acts[qk]["a"]
    assert abs(est.mean - exact) <= 4 * est.stderr + 1e-12, (est, exact)

    fisher = weight_fisher(prepared, LOSS, [batch])
    assert set(fisher) == {n for n, m in quantizable_ops(prepared).items() if hasattr(m, "weight")}
    assert set(operand_fisher(prepared, LOSS, [batch])) == set(quantizable_ops(prepared))


def test_bert_allocation_ptq_qat_and_reconstruction_on_dict_batches():
    from hawq.quant.reconstruct import ReconstructSettings, calibration_images, reconstruct_

    model = tiny_bert()
    prepared, _ = prepare(model, tokens(2, 6), strict=True)
    batches = [with_labels(tokens(4, 6, seed=s, pad=s % 3), seed=s) for s in range(3)]
    inventory = op_inventory(prepared, example=tokens(1, 6))
    report = curvature_report(
        inventory,
        traces=layer_traces(prepared, LOSS, batches, max_samples=20, sketch=8),
        acts=activation_traces(prepared, LOSS, batches, max_samples=20),
    )
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    plan = allocate(parse_hessian(report), [{"w_bits": 4, "a_bits": 8}, {"w_bits": 8, "a_bits": 8}],
                    budgets={"avg_bits": 7.0}, model=prepared, calib_batches=inputs,
                    example=tokens(1, 6)).plan  # fmt: skip
    assert set(plan.ops) == set(quantizable_ops(prepared))
    assert {s.w_bits for s in plan.ops.values()} == {4, 8}

    qmodel = quantize_(prepared, plan)
    calibrate(qmodel, inputs)  # dicts of keyword inputs
    fp, q = model(**inputs[0]).logits, qmodel(**inputs[0]).logits
    assert (q - fp).abs().max() < 0.5 * fp.abs().max()

    images = calibration_images(inputs, 3)
    assert images["input_ids"].shape == (12, 6)
    fp_prepared, _ = prepare(model, tokens(2, 6), strict=True)
    rec = reconstruct_(qmodel, fp_prepared, images, ReconstructSettings(iters=4, batch_size=4))
    assert rec and all(r["after"] <= r["before"] for r in rec.values())

    qat, _ = prepare(tiny_bert(), tokens(2, 6), strict=True)
    qat = quantize_(qat, Plan(ops={n: OpSetting(w_bits=4, a_bits=8) for n in plan.ops}),
                    method="lsq")  # fmt: skip
    calibrate(qat, inputs)
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    qat.train()
    losses = []
    for _ in range(4):
        for b in batches:
            loss = LOSS(qat, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns through the fake quantizers


def test_vit_converts_to_integer_only():
    """The graph converter runs a ``transformers`` ViT integer-only (its ``ModelOutput``
    returns the logits), attention products included."""
    from hawq.integer import convert

    torch.manual_seed(0)
    images = torch.randn(32, 3, 16, 16)
    qmodel, _ = prepare(tiny_vit(), images[:2], strict=True)
    quantize_(qmodel, Plan(OpSetting(w_bits=8, a_bits=8)))
    calibrate(qmodel, [(images,)])
    imodel = convert(qmodel.eval(), [(images,)])
    assert type(imodel).__name__ == "IntegerGraph" and not imodel.float_ops
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        got, want = imodel(x), qmodel(x).logits
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


def test_bert_exports_to_onnx_with_every_product_on_integer_kernels(tmp_path):
    """ORT's optimized graph of the QDQ export: all 18 captured products (projections,
    ``q @ k^T``, ``attn @ v``, the pooler and the classifier) on integer kernels."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from hawq.quant.onnx_export import export_onnx

    example = tokens(2, 6)
    qmodel, report = prepare(tiny_bert(), example, strict=True)
    quantize_(qmodel, Plan(OpSetting(w_bits=8, a_bits=8)))
    calibrate(qmodel, [tokens(8, 6, seed=s, pad=2) for s in range(2)])
    path = export_onnx(qmodel.eval(), tuple(example.values()), tmp_path / "bert.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    integer = {"MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "MatMulInteger"}
    assert sum(k in integer for k in kinds) == len(report.ops) == 18, kinds
    assert not {"MatMul", "Gemm", "FusedMatMul", "FusedGemm"} & set(kinds), kinds
    batch = tokens(3, 6, seed=7)
    with torch.no_grad():
        ref = qmodel(**batch).logits.numpy()
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, (v.numpy() for v in batch.values()))))[0]
    assert abs(out - ref).max() <= 0.05 * abs(ref).max() + 1e-3
