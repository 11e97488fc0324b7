"""Example inputs of a prepared model (``model.prepare.inputs``): keyword inputs such as a
``transformers`` model's ``input_ids`` + ``attention_mask``, drawn from their spec, traced
on, and fed by every op probe; the mask stays an input (never baked into the graph)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawq.checkpoint import build_model, load_model, save_model
from hawq.errors import HawqError
from hawq.models.examples import ExampleSpec, example_spec, keyword_spec
from hawq.models.ops import op_inventory, quantizable_ops
from hawq.models.own import prepared

INPUTS = {
    "input_ids": {"shape": [9], "dtype": "int64", "vocab_size": 30},
    "attention_mask": {"shape": [9], "dtype": "int64", "vocab_size": 2},
}


class Masked(nn.Module):
    """Embeddings, a masked attention product written with ``@`` and a head."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        scores = (h @ h.transpose(1, 2)).masked_fill(attention_mask[:, None, :] == 0, -1e4)
        return self.fc((scores.softmax(-1) @ h).mean(1))


def test_a_keyword_spec_draws_seeded_batches_of_each_input():
    spec = keyword_spec({**INPUTS, "pixels": {"shape": [3, 4, 4]}, "flag": {"shape": [2],
                         "dtype": "int32", "fill": 1}})  # fmt: skip
    a, b = spec.make(5), spec.make(5)
    assert list(a) == ["input_ids", "attention_mask", "pixels", "flag"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same draw every time
    assert a["input_ids"].shape == (5, 9) and 0 <= a["input_ids"].min() <= a["input_ids"].max() < 30
    assert set(a["attention_mask"].unique().tolist()) <= {0, 1}
    assert a["pixels"].dtype == torch.float32 and a["pixels"].shape == (5, 3, 4, 4)
    assert a["flag"].dtype == torch.int32 and bool((a["flag"] == 1).all())


@pytest.mark.parametrize(
    "inputs,match",
    [({}, "non-empty mapping"),
     ({"ids": {"dtype": "int64"}}, r"inputs.ids=.*allowed a mapping with shape"),
     ({"ids": {"shape": [4], "dtype": "int64"}}, r"inputs.ids.vocab_size=None"),
     ({"ids": {"shape": [4], "dtype": "bool"}}, r"inputs.ids.dtype=bool"),
     ({"ids": {"shape": [0], "vocab_size": 3}}, r"inputs.ids.shape=\[0\]"),
     ({"ids": {"shape": [4], "typo": 1}}, r"inputs.ids=.*allowed a mapping")],
)  # fmt: skip
def test_bad_keyword_inputs_are_one_line_naming_the_key(inputs, match):
    with pytest.raises(HawqError, match=match):
        keyword_spec(inputs)


def test_a_keyword_model_is_prepared_probed_and_reloaded(tmp_path):
    import sys

    sys.modules[__name__].Masked = Masked  # reachable by _target_
    cfg = {"_target_": f"{__name__}.Masked", "prepare": {"inputs": INPUTS}}
    model = build_model(cfg)
    assert set(quantizable_ops(model)) == {"matmul", "matmul_1", "fc"}
    assert isinstance(example_spec(model), ExampleSpec) and example_spec(model).keyword
    macs = {o.name: o.macs for o in op_inventory(model)}  # the probe feeds ids and a mask
    assert macs == {"matmul": 9 * 9 * 16, "matmul_1": 9 * 16 * 9, "fc": 16 * 3}
    save_model(tmp_path / "m.pt", model, cfg)
    loaded, _ = load_model(tmp_path / "m.pt")
    x = keyword_spec(INPUTS).make(4)
    assert torch.equal(loaded(**x), model(**x))


def test_the_mask_of_a_transformers_bert_stays_an_input():
    """Prepared on one random mask, the model equals the original on other masks, full ones
    included (a mask baked into the graph, or a branch taken on its values, would differ)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=9, num_labels=3)  # fmt: skip
    bert = transformers.BertForSequenceClassification(cfg).eval()
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.load_state_dict(bert.state_dict())
    model = prepared(bert, inputs=INPUTS)
    assert "bert.encoder.layer.0.attention.self.qk" in quantizable_ops(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (6, 9), generator=g)
    lengths = torch.randint(2, 10, (6, 1), generator=g)
    for mask in (torch.ones(6, 9, dtype=torch.long), (torch.arange(9)[None] < lengths).long()):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
            want = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
