"""Integer-only conversion of token models and of pointwise functions by table.

A model taking token ids converts as an image model does: the ids pass as they are, index
arithmetic (position ids, token types, ``gather``) is replayed on them, an embedding is a
lookup in its table quantised onto the residual stream, and every pointwise function of
``TABLE_FUNCTIONS`` (tanh, sigmoid, SiLU, GELU in both forms...) is one exact table.

Oracles: brute force for the tables; the ``reference`` backend (every backend bit-exact to
it); the fake-quant model (close values; the same argmax on most samples); the pickled
model through the safe loader (the same integers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.gelu import pointwise_table
from hawq.integer.graph import steps
from hawq.integer.graph.convert import convert_graph
from hawq.io import load_torch, save_torch
from hawq.models.own import prepared
from hawq.quant import Plan, calibrate, quantize_

VOCAB, LENGTH = 50, 12


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


class TokenNet(nn.Module):
    """Word + position (an integer buffer sliced by the sequence length) + type embeddings
    (``F.embedding`` of a parameter, ids from ``gather``), LayerNorm, an SDPA block with a
    SiLU MLP, a tanh pooler on the first token, a head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(LENGTH, dim)
        self.types = nn.Parameter(torch.randn(2, dim) * 0.1)
        self.register_buffer("position_ids", torch.arange(LENGTH)[None])
        self.register_buffer("type_ids", torch.zeros(1, LENGTH, dtype=torch.long))
        self.norm, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim)
        self.pool, self.head = nn.Linear(dim, dim), nn.Linear(dim, 5)

    def forward(self, x):
        b, t = x.shape
        pos = self.position_ids[:, :t]
        types = torch.gather(self.type_ids.expand(b, -1), 1, pos.expand(b, -1) * 0)
        h = self.words(x) + self.positions(pos) + F.embedding(types, self.types)
        h = self.norm(h)
        q, k, v = self.qkv(h).view(b, t, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        h = h + self.proj(a)
        h = h + self.fc2(self.act(self.fc1(self.norm2(h))))
        return self.head(torch.tanh(self.pool(h[:, 0])))


def fake_quant_ids(model: nn.Module, plan: Plan | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = prepared(model, input_shape=[LENGTH], input_dtype="int64", vocab_size=VOCAB).eval()
    quantize_(model, plan or Plan(), None, True)
    calibrate(model, [(ids(64, 0),)])
    return model.eval()


@pytest.fixture(scope="module")
def token_pair():
    torch.manual_seed(0)
    q = fake_quant_ids(TokenNet())
    return q, convert_graph(q, [(ids(32, 1),), (ids(32, 2),)])


def test_a_token_model_converts_to_integers_only(token_pair):
    q, im = token_pair
    assert im.float_ops == [] and im.in_grid is None  # ids pass as they are
    children = list(im.steps.children())
    assert sum(isinstance(m, steps.Lookup) for m in children) == 3  # the embeddings
    fused = [m for m in children if isinstance(m, steps.Linear) and m.lut is not None]
    assert len(fused) == 2  # SiLU in fc1's epilogue, tanh in the pooler's
    for t in im.state_dict().values():
        assert not t.is_floating_point() or t.dtype == torch.float64
    x = ids(40, 3)  # another batch size than calibration's
    with ops.backend("reference"):
        ref = im.forward_int(im.quantize_input(x))
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(im.quantize_input(x)), ref)
    with torch.no_grad():
        fq, out = q(x), im(x)
    assert (out - fq).abs().max() <= 0.1 * fq.abs().max()
    assert (out.argmax(1) == fq.argmax(1)).float().mean() >= 0.9


def test_a_shorter_sequence_runs_and_the_model_pickles(token_pair, tmp_path):
    """Position ids are sliced by the traced length: 7 tokens run the same graph."""
    q, im = token_pair
    back = load_torch(save_torch(tmp_path / "im.pt", im))
    x = ids(6, 4)[:, :7]
    assert torch.equal(back(x), im(x))
    with torch.no_grad():
        assert (im(x) - q(x)).abs().max() <= 0.1 * q(x).abs().max()
    with pytest.raises(HawqError, match="token ids, not floats"):
        im(x.float())


def _hf_text(name: str, transformers):
    size = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32,
                                      max_position_embeddings=LENGTH, **size)  # fmt: skip
        return transformers.BertForSequenceClassification(cfg)
    if name == "roberta":  # position ids from the ids: ne(pad), cumsum, *, + on integers
        cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32,
                                         max_position_embeddings=LENGTH + 2, **size)  # fmt: skip
        return transformers.RobertaForSequenceClassification(cfg)
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                        hidden_dim=64, max_position_embeddings=LENGTH,
                                        num_labels=3)  # fmt: skip
    return transformers.DistilBertForSequenceClassification(cfg)


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_transformers_text_encoders_convert_to_integers_only(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    q = fake_quant_ids(_hf_text(name, transformers))
    im = convert_graph(q, [(ids(32, 1),)])
    assert im.float_ops == []
    x = ids(48, 5)
    with torch.no_grad():
        fq, out = q(x).logits, im(x)
    assert (out - fq).abs().max() <= 0.1 * fq.abs().max()
    assert (out.argmax(1) == fq.argmax(1)).float().mean() >= 0.9


class Ids2Float(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(LENGTH, 4)

    def forward(self, x):
        return self.fc(x.float() / VOCAB)


class MaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(VOCAB, 8, max_norm=1.0), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize(
    "make,match",
    [(Ids2Float, r"call_method float .*has no integer-only form"),
     (MaxNorm, r"emb \(Embedding\): max_norm")],
    ids=["ids_as_floats", "embedding_max_norm"],
)  # fmt: skip
def test_what_ids_cannot_do_is_named(make, match):
    q = fake_quant_ids(make())
    with pytest.raises(HawqError, match=match):
        convert_graph(q, [(ids(16, 1),)])


ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": nn.Sigmoid(),
    "silu": F.silu,
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish(),
    "mish": nn.Mish(),
}


class ActNet(nn.Module):
    def __init__(self, act, last: bool) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3 * 8 * 8, 32), act, nn.Linear(32, 6)
        self.last = last

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(x.flatten(1))))
        return self.act(h) if self.last else h


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("last", [False, True], ids=["hidden", "onto_logits"])
def test_pointwise_functions_are_tables(name, last):
    torch.manual_seed(0)
    model = prepared(ActNet(ACTIVATIONS[name], last), input_shape=[3, 8, 8]).eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    quantize_(model, Plan(), None, True)
    calibrate(model, [(x,)])
    im = convert_graph(model, [(x,)])
    assert im.float_ops == []
    y = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fq, out = model(y), im(y)
    assert (out - fq).abs().max() <= 0.05 * fq.abs().max() + 1e-3, name
    plain = convert_graph(model, [(x,)], fuse=False)  # the table fused into fc1's epilogue
    assert torch.equal(
        plain.forward_int(plain.quantize_input(y)), im.forward_int(im.quantize_input(y))
    )


@pytest.mark.parametrize("fn", [torch.tanh, torch.sigmoid, F.silu, F.mish], ids=str)
def test_pointwise_table_is_the_rounded_function_everywhere(fn):
    """Brute force over every input code: one rounding of fn(s q) onto the output grid."""
    s, so, z = 0.013, 0.009, 3
    t = pointwise_table(fn, s, -300, 300, so, z, -128, 127)
    for q in range(-300, 301):
        y = float(fn(torch.tensor(q * s, dtype=torch.float64)))
        want = min(max(round(y / so) + z, -128), 127)
        assert int(t[q + 300]) == want, q
    assert t.dtype == torch.int8
    with pytest.raises(HawqError, match="pointwise table: output scale"):
        pointwise_table(fn, s, -3, 3, 0.0, 0, -128, 127)


class BiasedAttention(nn.Module):
    """Patches -> one attention whose scores get a relative position bias (a parameter table
    gathered by an integer index buffer, as Swin's) and a causal mask (a float buffer with
    -inf above the diagonal), softmax, then ``AdaptiveAvgPool1d`` over the tokens -> head."""

    def __init__(self, dim: int = 32, tokens: int = 16) -> None:
        super().__init__()
        self.embed, self.qkv = nn.Linear(12, dim), nn.Linear(dim, 3 * dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1) * 0.5)
        pos = torch.arange(tokens)
        self.register_buffer("rel_index", pos[:, None] - pos[None, :] + tokens - 1)
        self.register_buffer("mask", torch.full((tokens, tokens), float("-inf")).triu(1))
        self.pool, self.head = nn.AdaptiveAvgPool1d(1), nn.Linear(dim, 5)

    def forward(self, x):
        b = x.shape[0]
        t = self.embed(x.reshape(b, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 12))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        scores = scores + self.table[self.rel_index] + self.mask
        h = torch.softmax(scores, dim=-1) @ v
        return self.head(self.pool(h.transpose(1, 2)).flatten(1))


def test_score_biases_and_masks_are_added_to_the_integer_scores():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = prepared(BiasedAttention(), input_shape=[3, 8, 8]).eval()
    quantize_(model, Plan(), None, True)
    calibrate(model, [(x,)])
    im = convert_graph(model, [(x,)])
    assert im.float_ops == [] and any(isinstance(m, steps.AddBias) for m in im.steps.children())
    y = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    xq = im.quantize_input(y)
    with ops.backend("reference"):
        ref = im.forward_int(xq)
    with ops.backend("cpu"):  # the masked scores (-2^29 units) through the cpu softmax kernel
        assert torch.equal(im.forward_int(xq), ref)
    with torch.no_grad():
        fq, out = model(y), im(y)
    assert (out - fq).abs().max() <= 0.05 * fq.abs().max()
    plain = convert_graph(model, [(x,)], fuse=False)
    assert torch.equal(plain.forward_int(plain.quantize_input(y)), ref)


def test_a_transformers_swin_converts_to_integers_only():
    """Swin: relative position biases on the scores, AdaptiveAvgPool1d pooling."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                  num_heads=[2, 2], window_size=4, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    model = prepared(transformers.SwinForImageClassification(cfg), input_shape=[3, 32, 32]).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quantize_(model, Plan(), None, True)
    calibrate(model, [(x,)])
    im = convert_graph(model, [(x[:16],)])
    assert im.float_ops == []
    y = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fq, out = model(y).logits, im(y)
    assert (out - fq).abs().max() <= 0.05 * fq.abs().max()
    assert (out.argmax(1) == fq.argmax(1)).float().mean() >= 0.9


class WrittenOut(nn.Module):
    """Activations written elementwise, as models in the wild do."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "gelu_new":  # GPT-2
            return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3.0))))
        if self.kind == "quick_gelu":  # CLIP
            return x * torch.sigmoid(1.702 * x)
        return x * torch.sigmoid(x)  # swish


@pytest.mark.parametrize("kind", ["gelu_new", "quick_gelu", "swish"])
def test_activations_written_out_fold_into_one_table(kind):
    """The elementwise region (products of values of one tensor) becomes one exact table:
    integer-only, fused == unfused, close to fake-quant."""
    torch.manual_seed(0)
    model = prepared(ActNet(WrittenOut(kind), last=False), input_shape=[3, 8, 8]).eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    quantize_(model, Plan(), None, True)
    calibrate(model, [(x,)])
    im = convert_graph(model, [(x,)])
    assert im.float_ops == []
    fused = [m for m in im.steps.children() if isinstance(m, steps.Linear) and m.lut is not None]
    assert len(fused) == 1  # the whole region is fc1's epilogue table
    y = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fq, out = model(y), im(y)
    assert (out - fq).abs().max() <= 0.05 * fq.abs().max() + 1e-3
    plain = convert_graph(model, [(x,)], fuse=False)
    yq = im.quantize_input(y)
    assert torch.equal(plain.forward_int(plain.quantize_input(y)), im.forward_int(yq))


def test_a_transformers_gpt2_converts_to_integers_only():
    """GPT-2: a causal mask built from ids by index arithmetic fills the int32 scores, its
    tanh-GELU written out elementwise folds into one table, Conv1D is addmm + bias."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                  n_positions=LENGTH, num_labels=3, pad_token_id=0,
                                  use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    q = fake_quant_ids(transformers.GPT2ForSequenceClassification(cfg))
    im = convert_graph(q, [(ids(32, 1),)])
    assert im.float_ops == [] and any(isinstance(m, steps.MaskFill) for m in im.steps.modules())
    x = ids(48, 5)
    with ops.backend("reference"):
        ref = im.forward_int(im.quantize_input(x))
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(im.quantize_input(x)), ref)
    with torch.no_grad():
        fq, out = q(x).logits, im(x)
    assert (out - fq).abs().max() <= 0.1 * fq.abs().max()
    assert (out.argmax(1) == fq.argmax(1)).float().mean() >= 0.9


def padded(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Keyword inputs of sequences of varying length: ids, and the mask (1 on real tokens)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(LENGTH)[None] < torch.randint(3, LENGTH + 1, (n, 1), generator=g)).long()
    return {"input_ids": torch.randint(1, VOCAB, (n, LENGTH), generator=g) * mask,
            "attention_mask": mask}  # fmt: skip


@pytest.fixture(scope="module")
def masked_bert():
    """A ``transformers`` BERT called ``model(input_ids=, attention_mask=)``, fake-quant, and
    its integer model (one placeholder per keyword input)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=LENGTH, num_labels=3)  # fmt: skip
    spec = {"input_ids": {"shape": [LENGTH], "dtype": "int64", "vocab_size": VOCAB},
            "attention_mask": {"shape": [LENGTH], "dtype": "int64", "vocab_size": 2}}  # fmt: skip
    q = prepared(transformers.BertForSequenceClassification(cfg), inputs=spec).eval()
    quantize_(q, Plan(), None, True)
    calibrate(q, [(padded(64, 0), None)])
    return q.eval(), convert_graph(q, [(padded(32, 1), None), (padded(32, 2), None)])


def test_keyword_inputs_and_the_attention_mask_reach_the_integer_model(masked_bert, tmp_path):
    q, im = masked_bert
    assert im.float_ops == [] and im.input_names == ["input_ids", "attention_mask"]
    x = padded(48, 5)
    with torch.no_grad():
        fq, out = q(**x).logits, im(**x)
        full = im(input_ids=x["input_ids"], attention_mask=torch.ones_like(x["attention_mask"]))
    assert (out - fq).abs().max() <= 0.1 * fq.abs().max()
    assert (out.argmax(1) == fq.argmax(1)).float().mean() >= 0.9
    assert not torch.equal(full, out)  # the mask is read, not baked in
    args = (x["input_ids"], x["attention_mask"])
    with ops.backend("reference"):
        ref = im.forward_int(*args)
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(*args), ref)
    assert torch.equal(im(*args), out)  # positional, in input_names' order
    save_torch(tmp_path / "im.pt", im)
    assert torch.equal(load_torch(tmp_path / "im.pt")(**x), out)


@pytest.mark.parametrize(
    "call,match",
    [(lambda im, x: im(input_ids=x["input_ids"]), r"missing \['attention_mask'\]"),
     (lambda im, x: im(**x, token_type_ids=x["input_ids"]), r"unknown \['token_type_ids'\]"),
     (lambda im, x: im(x["input_ids"], x["attention_mask"].float()),
      "'attention_mask' must be integer")],
    ids=["missing", "unknown", "float_mask"],
)  # fmt: skip
def test_wrong_keyword_inputs_are_one_line(masked_bert, call, match):
    with pytest.raises(HawqError, match=match):
        call(masked_bert[1], padded(4, 9))
