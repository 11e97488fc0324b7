"""The graph-driven integer converter on models hawq did not write (issue 30).

Oracles: the hand-written integer ViT/ResNet hawq shipped before (bit for bit), the
converter with its fusions off (the fused kernels must give the same integers), the
``reference`` backend (every other backend bit-exact to it), and the fake-quant model
(close values, same argmax on a trained model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.graph import steps
from hawq.integer.graph.convert import IntegerGraph, convert_graph
from hawq.integer.layernorm import IntLayerNorm
from hawq.io import load_torch, save_torch
from hawq.models import zoo
from hawq.models.own import prepared
from hawq.quant import Plan

from .cases import fake_quant, handwritten, randomize_bn, tiny_resnet, tiny_vit


class MhaNet(nn.Module):
    """Patches -> ``nn.MultiheadAttention`` (batch second) -> mean over tokens -> head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(48, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        b = x.shape[0]
        p = x.reshape(b, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 64, 48)
        t = self.embed(p)
        h = self.norm(t).transpose(0, 1)  # (T, B, D)
        t = t + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        return self.head(t.mean(dim=1))


def _post_norm():
    m = zoo.TorchViT(dim=32, depth=2, heads=2, mlp_dim=64)
    layer = nn.TransformerEncoderLayer(32, 2, 64, 0.0, activation="relu", batch_first=True,
                                       norm_first=False)  # fmt: skip
    m.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return m


ZOO = {
    "sdpa_block": lambda: zoo.SdpaViT(dim=32, depth=2, heads=2, mlp_dim=64),
    "matmul_block": lambda: zoo.SdpaViT(dim=32, depth=2, heads=2, mlp_dim=64, use_sdpa=False),
    "multihead_attention": MhaNet,
    "transformer_encoder_layer": lambda: zoo.TorchViT(dim=32, depth=2, heads=2, mlp_dim=64),
    "post_norm_encoder_relu": _post_norm,
    "cnn_bn_residual": lambda: zoo.SmallCNN(width=8),
}


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quantized_zoo(name: str, plan: Plan | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = ZOO[name]()
    randomize_bn(model)
    return fake_quant(prepared(model), images(32, 0), plan)


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_pair(request):
    q = quantized_zoo(request.param)
    return request.param, q, convert_graph(q, [(images(16, 1),), (images(16, 2),)])


def test_every_zoo_model_converts_to_integers_only(zoo_pair):
    name, q, im = zoo_pair
    assert isinstance(im, IntegerGraph)
    called = {type(m) for m in im.steps.children()}
    assert called <= {steps.Linear, steps.Conv, steps.MatMul, steps.Attention, steps.Requant,
                      steps.Lookup, steps.Softmax, steps.ResidualAdd, steps.Clamp, steps.Mean,
                      IntLayerNorm}  # fmt: skip
    for t in im.state_dict().values():  # integers only (float64 scale records for export)
        assert not t.is_floating_point() or t.dtype == torch.float64
    x = images(24, 3)  # another batch size than the calibration's
    xq = im.quantize_input(x)
    with ops.backend("reference"):
        ref = im.forward_int(xq)
    assert ref.dtype == torch.int32 and ref.shape == (24, 10)
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(xq), ref), name
    with torch.no_grad():
        fq, out = q(x), im(x)
    assert (out - fq).abs().max() <= 0.15 * fq.abs().max(), name  # untrained: values, not argmax


def test_fusions_compute_the_same_integers(zoo_pair):
    """Residual add, GELU table and attention fused vs the plain steps: bit-identical."""
    name, q, im = zoo_pair
    plain = convert_graph(q, [(images(16, 1),), (images(16, 2),)], fuse=False)
    xq = im.quantize_input(images(8, 4))
    assert torch.equal(im.forward_int(xq), plain.forward_int(xq)), name
    assert len(list(plain.steps.children())) >= len(list(im.steps.children()))


@pytest.mark.parametrize("make", [tiny_vit, tiny_resnet], ids=["vit", "resnet"])
@pytest.mark.parametrize("plan", [None, "mixed"])
def test_bit_identical_to_the_hand_written_classes(make, plan):
    torch.manual_seed(0)
    net = make()
    randomize_bn(net)
    p = None
    if plan == "mixed":  # 4-bit weights (packed), 6-bit activations, per-tensor scales
        p = Plan.from_dict({"_default": {"w_bits": 4, "a_bits": 6, "granularity": "per_tensor"}})
    q = fake_quant(net, images(32, 0), p)
    batches = [(images(16, 1),), (images(16, 2),)]
    old, new = handwritten(q, batches), convert_graph(q, batches)
    assert new.s_r == old.s_r and new.logit_scale == old.logit_scale
    x = images(8, 3)
    assert torch.equal(new.quantize_input(x).flatten(), old.quantize_input(x).flatten()) or \
        make is tiny_vit  # the ViT's hand-written input was patchified first  # fmt: skip
    assert torch.equal(new.forward_int(new.quantize_input(x)),
                       old.forward_int(old.quantize_input(x)))  # fmt: skip


def test_graph_model_pickles_through_the_safe_loader(tmp_path):
    q = quantized_zoo("transformer_encoder_layer")
    im = convert_graph(q, [(images(16, 1),)])
    back = load_torch(save_torch(tmp_path / "im.pt", im))
    x = images(4, 5)
    xq = im.quantize_input(x)
    assert torch.equal(back.forward_int(back.quantize_input(x)), im.forward_int(xq))


def test_a_node_without_integer_form_is_named():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return torch.cumsum(self.fc(x.flatten(1)), 1)

    q = fake_quant(prepared(Cumsum()), images(8, 0))
    with pytest.raises(HawqError, match=r"call_function cumsum .*has no integer-only form"):
        convert_graph(q, [(images(8, 1),)])


def test_a_float_op_left_by_the_plan_is_named():
    q = quantized_zoo("cnn_bn_residual", Plan.from_dict({"conv2": {"w_bits": None,
                                                                    "a_bits": None}}))
    with pytest.raises(HawqError, match="conv2"):
        convert_graph(q, [(images(8, 1),)])


class SiluNet(nn.Module):
    """Patches -> Linear -> SiLU * sigmoid gate (the product of two activations has no
    integer form; SiLU and sigmoid are tables) -> Linear -> token mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(48, 32), nn.SiLU(), nn.Linear(32, 10)

    def forward(self, x):
        b = x.shape[0]
        p = x.reshape(b, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 64, 48)
        h = self.fc1(p)
        return self.fc2(self.act(h) * torch.sigmoid(h)).mean(1)


@pytest.mark.parametrize("case", ["silu_gate", "float_conv_bn", "float_attention_product"])
def test_float_islands_run_in_float_and_are_reported(case, tmp_path):
    if case == "silu_gate":
        q = fake_quant(prepared(SiluNet()), images(32, 0))
        expect = {"call_function mul in model (node mul)"}  # SiLU, sigmoid: integer tables
    elif case == "float_conv_bn":
        q = quantized_zoo("cnn_bn_residual", Plan.from_dict({"conv2": {"w_bits": None,
                                                                        "a_bits": None}}))
        expect = {"conv2 (Conv2d)", "bn2 (BatchNorm2d)"}  # the BN joins the float conv
    else:
        op = "encoder.layers.0.self_attn.qk"
        q = quantized_zoo("transformer_encoder_layer", Plan.from_dict({op: {"w_bits": None,
                                                                             "a_bits": None}}))
        expect = {f"call_function matmul in model.{op} (node matmul)"}
    with pytest.raises(HawqError, match="has no integer-only form|must follow a quantized op"):
        convert_graph(q, [(images(16, 1),)])  # off by default: no silent float
    im = convert_graph(q, [(images(16, 1),)], float_islands=True)
    assert expect <= set(im.float_ops)
    x = images(8, 3)
    with torch.no_grad():
        fq, out = q(x), im(x)
    assert (out - fq).abs().max() <= 0.1 * fq.abs().max()
    back = load_torch(save_torch(tmp_path / "im.pt", im))  # allow-listed float ops only
    assert torch.equal(back(x), out) and back.float_ops == im.float_ops
