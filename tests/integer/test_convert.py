"""Integer ViT / ResNet: bit-exact across backends, close to the fake-quant model."""

from __future__ import annotations

import os

import pytest
import torch

from hawq.errors import HawqError
from hawq.integer import ops
from hawq.integer.convert import convert
from hawq.quant import Plan
from tests.integer.cases import fake_quant, randomize_bn, tiny_resnet, tiny_vit

MIXED = {"_default": {"w_bits": 8, "a_bits": 8},
         "blocks.0.mlp.fc1": {"w_bits": 4}, "blocks.1.attn.qkv": {"w_bits": 4, "a_bits": 6},
         "blocks.0.attn.qk": {"a_bits": 6}}  # fmt: skip


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    q = fake_quant(tiny_vit(), _images(64, 1))
    return q, convert(q, [(_images(64, 1),)])


@pytest.fixture(scope="module")
def resnet_pair():
    torch.manual_seed(0)
    m = tiny_resnet()
    randomize_bn(m)
    q = fake_quant(m, _images(64, 1))
    return q, convert(q, [(_images(64, 1),)])


@pytest.mark.parametrize("pair", ["vit_pair", "resnet_pair"])
def test_integer_model_tracks_fake_quant(pair, request):
    q, im = request.getfixturevalue(pair)
    x = _images(48, 2)
    with torch.no_grad():
        ref, out = q(x), im(x)
    # untrained tiny models: small logit margins, so compare values, not only argmax
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("pair", ["vit_pair", "resnet_pair"])
def test_integer_graph_is_integer_and_bit_exact_across_backends(pair, request):
    _, im = request.getfixturevalue(pair)
    xq = im.quantize_input(_images(4, 3))
    assert xq.dtype == torch.int8
    with ops.backend("reference"):
        ref = im.forward_int(xq)
    assert ref.dtype == torch.int32
    for t in im.state_dict().values():  # only integers are stored, besides acc_scale records
        assert not t.is_floating_point() or t.dtype == torch.float64
    with ops.backend("int_mm"):
        assert torch.equal(im.forward_int(xq), ref)
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(xq), ref)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if ops.triton_available():
        with ops.backend("triton"):
            assert torch.equal(im.forward_int(xq[:1]), ref[:1])


def layer(im, op: str):
    """The integer layer of quantized op ``op``."""
    return im.steps.get_submodule(im.op_paths[op])


def test_first_layer_input_codes_equal_fake_quant_codes(vit_pair):
    q, im = vit_pair
    x = _images(8, 4)
    patches = q.patchify(x)
    aq = q.patch_embed.a_quant
    fq_codes = torch.round((aq(patches) / aq.scale) + aq.zero_point)
    assert torch.equal(q.patchify(im.quantize_input(x)).float() - im.in_grid.shift, fq_codes)


def test_linear_layer_bit_exact_vs_float64_reference_of_the_same_arithmetic(vit_pair):
    """One int8 GEMM + dyadic requant vs the same layer in float64 (dequantized operands,
    the integer bias): equal codes except at near-ties (float64 rounding of the reference,
    the 2^-31 dyadic error); vs the float32 fake-quant layer: within one code."""
    q, im = vit_pair
    x = _images(8, 5)
    pe, grid = layer(im, "patch_embed"), im.in_grid
    xq = q.patchify(im.quantize_input(x))  # (B, N, C p p) codes
    with torch.no_grad():
        yi = pe(xq)  # int32 codes at s_r
        w = q.patch_embed.quantized_weight().double()
        acc_scale = pe.acc_scale  # s_x s_w per output channel
        b = (pe.bias.double() + grid.zero * pe.weight.double().sum(1)) * acc_scale
        y64 = (xq.double() - grid.zero) * grid.scale @ w.t() + b
        y32 = q.patch_embed(q.patchify(x))
    diff = (yi.double() - torch.round(y64 / im.s_r)).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() <= 1e-3
    assert (yi.double() - torch.round(y32.double() / im.s_r)).abs().max() <= 1


def test_mixed_plan_int4_weights_are_packed():
    torch.manual_seed(0)
    q = fake_quant(tiny_vit(), _images(32, 1), Plan.from_dict(MIXED))
    im = convert(q, [(_images(32, 1),)])
    fc1 = layer(im, "blocks.0.mlp.fc1")
    assert fc1.weight.dtype == torch.uint8 and fc1.weight.shape == (128, 32)
    assert layer(im, "blocks.0.mlp.fc2").weight.dtype == torch.int8
    norm1 = im.steps.get_submodule("blocks_1_norm1")  # writes the 6-bit qkv input grid
    assert norm1.out_hi - norm1.out_lo + 1 == 2**6
    x = _images(16, 2)
    xq = im.quantize_input(x)
    with ops.backend("reference"):
        ref = im.forward_int(xq)
    with ops.backend("cpu"):
        assert torch.equal(im.forward_int(xq), ref)
    with torch.no_grad():
        assert (im(x) - q(x)).abs().max() <= 0.15 * q(x).abs().max()


def test_unfolded_bn_is_folded_exactly_by_the_converter():
    torch.manual_seed(0)
    m = tiny_resnet()
    randomize_bn(m)
    q = fake_quant(m, _images(32, 1), fold_bn=False)
    im = convert(q, [(_images(32, 1),)])
    x = _images(16, 2)
    with torch.no_grad():
        ref, out = q(x), im(x)
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


@pytest.mark.parametrize("entry", [{"w_format": "fp8_e4m3"}, {"dynamic": True},
                                   {"granularity": "per_group", "group_size": 16}])  # fmt: skip
def test_non_integer_plans_fail_with_one_line(entry):
    plan = Plan.from_dict({"_default": {"w_bits": 8, "a_bits": 8, **entry}})
    q = fake_quant(tiny_resnet(), _images(16, 1), plan)
    with pytest.raises(HawqError, match="integer"):
        convert(q, [(_images(16, 1),)])


def test_float_op_fails_with_one_line():
    plan = Plan.from_dict({"_default": {"w_bits": 8, "a_bits": 8}, "fc": {"w_bits": None,
                                                                          "a_bits": None}})
    q = fake_quant(tiny_resnet(), _images(16, 1), plan)
    with pytest.raises(HawqError, match="fc"):
        convert(q, [(_images(16, 1),)])
