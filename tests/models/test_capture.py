"""prepare(): functional products and nn.MultiheadAttention become named quantizable ops."""

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.errors import HawqError
from hawq.models import ViT, quantizable_ops
from hawq.models.capture import prepare
from hawq.models.captured_mha import CapturedMultiheadAttention
from hawq.models.ops import MatMul
from hawq.quant import Plan, QuantMatMul, calibrate, quantize_

D, H, T, B = 16, 2, 6, 3
FP = {"w_bits": None, "a_bits": None}


class SdpaAttention(nn.Module):
    """qkv Linear -> F.scaled_dot_product_attention -> proj."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, d // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MatmulAttention(nn.Module):
    """q @ k^T, softmax, torch.matmul(attn, v); output projection via F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.w_out = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.b_out = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / D**0.5  # (B, T, T)
        out = torch.matmul(scores.softmax(dim=-1), self.v(x))
        return F.linear(out, self.w_out, self.b_out)


class Net(nn.Module):
    """blocks of ``block()`` with residuals, then a head on the mean token."""

    def __init__(self, block, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(self.norm(x).mean(dim=1))


class MhaNet(nn.Module):
    """nn.MultiheadAttention on (B, T, D) or (T, B, D) with a fixed key padding mask."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=batch_first)
        self.register_buffer("pad", torch.zeros(B, T, dtype=torch.bool))
        self.pad[0, -2:] = True  # the last two keys of sample 0 are padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, key_padding_mask=self.pad, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class Gated(nn.Module):
    """A product behind data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x @ x.transpose(-2, -1) @ x / T
        return self.fc(x)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def check_prepared(model: nn.Module, x: torch.Tensor, suffixes: tuple[str, ...] = ()):
    """Same outputs, full coverage, the expected op names; returns (prepared, report)."""
    model.eval()
    prepared, report = prepare(model, x, strict=True)
    torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)
    assert abs(report.share - 1.0) < 1e-9 and not report.left_out
    assert report.total_flops == report.original_flops > 0
    ops = quantizable_ops(prepared)
    assert list(ops) == report.ops and set(report.added) <= set(ops)
    for suffix in suffixes:
        assert any(n.endswith(suffix) for n in ops), (suffix, list(ops))
    return prepared, report


def quantized(model: nn.Module, x: torch.Tensor, plan: dict) -> nn.Module:
    q = quantize_(copy.deepcopy(model), Plan.from_dict(plan), None, True)
    calibrate(q, [(x,)])
    return q


@torch.no_grad()
def check_quantizes(prepared: nn.Module, x: torch.Tensor) -> None:
    """W8A8 stays close to float, W2A2 does not; 2 bits on any single MatMul alone changes
    the output (no product is skipped)."""
    ref = prepared(x)
    q8 = quantized(prepared, x, {"_default": {"w_bits": 8, "a_bits": 8}})
    assert float((q8(x) - ref).norm() / ref.norm()) < 0.05
    q2 = quantized(prepared, x, {"_default": {"w_bits": 2, "a_bits": 2}})
    assert not torch.allclose(q2(x), ref, atol=1e-4)
    matmuls = [n for n, m in quantizable_ops(prepared).items() if isinstance(m, MatMul)]
    for name in matmuls:
        q2 = quantized(prepared, x, {"_default": FP, name: {"a_bits": 2}})
        assert isinstance(quantizable_ops(q2)[name], QuantMatMul)
        assert not torch.allclose(q2(x), ref, atol=1e-4), f"{name} at 2 bits changed nothing"


def test_cnn_needs_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    prepared, report = check_prepared(model, x)
    assert report.added == [] and report.ops == ["0", "3", "7"]
    check_quantizes(prepared, x)


def test_hawq_vit_is_already_captured():
    model = ViT(image_size=8, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0)
    _, report = check_prepared(model, torch.randn(2, 3, 8, 8))
    assert report.added == [] and report.untraced == {}


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_becomes_qk_and_av(causal):
    model = Net(lambda: SdpaAttention(causal))
    x = tokens()
    prepared, report = check_prepared(model, x, (".qk", ".av"))
    assert report.added == [f"blocks.{i}.{r}" for i in (0, 1) for r in ("qk", "av")]
    assert report.ops[:4] == ["blocks.0.qkv", "blocks.0.qk", "blocks.0.av", "blocks.0.proj"]
    check_quantizes(prepared, x)


def test_matmul_operator_and_functional_linear():
    model = Net(MatmulAttention)
    x = tokens()
    prepared, report = check_prepared(model, x, ("blocks.0.matmul", "blocks.0.matmul_1"))
    assert isinstance(prepared.blocks[1].linear, nn.Linear)  # F.linear with own parameters
    assert report.renamed["blocks.1.w_out"] == "blocks.1.linear.weight"
    assert "blocks.1.w_out" not in prepared.state_dict()
    check_quantizes(prepared, x)


def test_prepared_model_deepcopies_and_pickles():
    model = Net(MatmulAttention).eval()
    x = tokens()
    prepared, _ = prepare(model, x)
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    for again in (copy.deepcopy(prepared), torch.load(buf, weights_only=False)):
        assert again.blocks[0].forward.module is again.blocks[0]
        again.blocks[0].matmul = MatMul()  # swapped ops are used (quantize_ does this)
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-5)


def test_einsum_and_bmm():
    class Mix(nn.Module):
        def forward(self, x):
            a = torch.einsum("bid,bjd->bij", x, x).softmax(-1)
            return torch.bmm(a, x) + torch.einsum("bij,bjd->bid", a, x)

    x = tokens()
    check_prepared(Net(Mix), x, (".einsum", ".einsum_1", ".matmul"))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    model = MhaNet(batch_first)
    x = tokens() if batch_first else tokens().transpose(0, 1)
    prepared, report = check_prepared(model, x, ("mha.q_proj", "mha.qk", "mha.av"))
    assert report.replaced == ["mha"] and isinstance(prepared.mha, CapturedMultiheadAttention)
    assert report.ops == [f"mha.{n}" for n in ("q_proj", "k_proj", "v_proj", "qk", "av",
                                               "out_proj")]  # fmt: skip
    check_quantizes(prepared, x)


@pytest.mark.parametrize("same_dim", [True, False])
def test_captured_mha_matches_every_output(same_dim):
    kdim = None if same_dim else 12
    mha = nn.MultiheadAttention(D, H, kdim=kdim, vdim=kdim).eval()
    cap = CapturedMultiheadAttention.from_module(mha).eval()
    q, kv = torch.randn(T, B, D), torch.randn(T + 1, B, kdim or D)
    attn_mask = torch.randn(T, T + 1)
    pad = torch.zeros(B, T + 1, dtype=torch.bool)
    pad[1, :3] = True
    for kw in (
        {},
        {"average_attn_weights": False},
        {"attn_mask": attn_mask > 1},
        {"attn_mask": attn_mask, "key_padding_mask": pad},
        {"need_weights": False},
    ):
        for got, want in zip(cap(q, kv, kv, **kw), mha(q, kv, kv, **kw)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = cap(q[:, 0], kv[:, 0], kv[:, 0])  # unbatched (L, E)
    for g, w in zip(got, mha(q[:, 0], kv[:, 0], kv[:, 0])):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    fresh = CapturedMultiheadAttention(D, H, kdim=kdim, vdim=kdim)
    fresh.load_state_dict(mha.state_dict())  # the original checkpoint keys load
    torch.testing.assert_close(fresh.eval()(q, kv, kv)[0], mha(q, kv, kv)[0])


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_uses_captured_attention(norm_first):
    model = Encoder(norm_first)
    x = tokens()
    prepared, report = check_prepared(model, x, ("self_attn.qk", "self_attn.av"))
    assert report.replaced == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    calls = []
    prepared.encoder.layers[1].self_attn.av.register_forward_hook(lambda *a: calls.append(1))
    prepared(x)
    assert calls == [1]  # the layer ran our module (no fused fast path)
    check_quantizes(prepared, x)


def test_transformer_encoder_padding_mask_matches_on_real_tokens():
    layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()  # nested-tensor fast path in the original
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -2:] = True
    x = tokens()
    prepared, report = prepare(enc, {"src": x, "src_key_padding_mask": pad}, strict=True)
    assert report.share == 1.0 and len(report.replaced) == 2
    with torch.no_grad():
        got, want = prepared(x, src_key_padding_mask=pad), enc(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], atol=1e-5, rtol=1e-5)


def test_untraceable_product_is_reported(caplog):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = SdpaAttention()
            self.gate = Gated()

        def forward(self, x):
            return self.gate(self.attn(x))

    model = Model().eval()
    x = tokens()
    with caplog.at_level(logging.WARNING, logger="hawq"):
        prepared, report = prepare(model, x)
    torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)
    assert "gate" in report.untraced and "attn.qk" in report.ops
    assert {x.module for x in report.left_out} == {"gate"}
    assert 0 < report.share < 1
    assert "gate" in caplog.text
    with pytest.raises(HawqError, match="gate"):
        prepare(model, x, strict=True)


def test_dict_inputs_and_token_ids():
    class Lm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, D)
            self.attn = SdpaAttention()

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            if attention_mask is not None:
                h = h * attention_mask[..., None]
            return self.attn(h)

    ids = torch.randint(0, 11, (B, T))
    model = Lm().eval()
    inputs = {"input_ids": ids, "attention_mask": torch.ones(B, T)}
    prepared, report = prepare(model, inputs, strict=True)
    torch.testing.assert_close(prepared(**inputs), model(**inputs), atol=1e-5, rtol=1e-5)
    assert "attn.qk" in report.ops


def test_train_and_eval_graphs_and_argument_guard():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)

        def forward(self, x, scale=None):
            q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            p = 0.5 if self.training else 0.0  # read while tracing: one graph per mode
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
            return out.transpose(1, 2).reshape(B, T, D)

    model = Net(Drop, depth=1).eval()
    x = tokens()
    prepared, _ = prepare(model, x, strict=True)
    prepared.train()
    torch.manual_seed(1)
    a = prepared(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, prepared(x))  # dropout inside the captured attention
    prepared.eval()
    torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(HawqError, match="captured with scale=.* got 0.1"):
        prepared.blocks[0](x, scale=0.1)  # a different non-tensor argument: one clear line


def test_transformers_bert_if_installed():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5)}
    prepared, report = prepare(model, inputs)
    got, want = prepared(**inputs), model(**inputs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert report.share == 1.0 or report.left_out  # nothing is lost silently


def test_op_inventory_of_a_token_model_from_example_inputs():
    """A model taking token ids (and a dict of them) gets its op inventory from example
    inputs: zeros of an image shape could not even run it."""
    from hawq.models.ops import op_inventory

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None):
            h = self.fc(self.emb(input_ids))  # (B, T, 8)
            return self.head(h.mean(1))

    ids = torch.randint(0, 50, (4, 7))
    for example in (ids, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        inv = {i.name: i.macs for i in op_inventory(Tokens(), example=example)}
        assert inv == {"fc": 7 * 8 * 8, "head": 8 * 2}  # per sample


def _logged(fn):
    """A decorator as ``transformers`` writes them: ``(self, *args, **kwargs)`` wrapper."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return wrapper


class Branchy(nn.Module):
    """Control flow on shapes, ``**kwargs`` flags and a decorated forward: traced with
    the example's values, every decision guarded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    @_logged
    def forward(self, x, mask=None, **kwargs):
        if x.shape[1] > 4:  # a shape decision
            x = x @ x.transpose(-2, -1) @ x / x.shape[1]
        if kwargs.get("double", False):  # a flag passed through **kwargs
            x = 2 * x
        if mask is not None:
            x = x * mask
        return self.fc(x)


def test_shape_flag_and_decorator_decisions_are_captured_and_guarded():
    model = Branchy().eval()
    x, mask = tokens(), torch.rand(B, T, 1)
    prepared, report = prepare(model, {"x": x, "mask": mask, "double": True}, strict=True)
    assert report.share == 1.0 and {"matmul", "matmul_1"} <= set(report.ops)
    x2, mask2 = torch.randn(5, 9, D), torch.rand(5, 9, 1)  # other batch and length
    torch.testing.assert_close(prepared(x2, mask2, double=True), model(x2, mask2, double=True),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    branch = r"condition at test_capture.py:\d+ was True .* False on this call"
    with pytest.raises(HawqError, match=branch):
        prepared(torch.randn(2, 3, D), torch.rand(2, 3, 1), double=True)  # length 3 <= 4
    with pytest.raises(HawqError, match="'double' was True .* False on this call"):
        prepared(x, mask, double=False)
    with pytest.raises(HawqError, match="mask"):
        prepared(x, None, double=True)  # the example passed a tensor mask
