"""LayerNorm -> Linear channel equalization: exact in FP, equal channel ranges at alpha = 1."""

from __future__ import annotations

import copy

import pytest
import torch

from hawq.models import ViT
from hawq.quant.equalize import channel_ranges, equalize_, ln_consumers


def _vit() -> ViT:
    torch.manual_seed(0)
    m = ViT(image_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=24, dropout=0.0)
    m = m.double().eval()
    with torch.no_grad():  # uneven channels, as trained LayerNorms have
        for _, norm, _, _ in ln_consumers(m):
            norm.weight.copy_(torch.exp(torch.randn(16, dtype=torch.float64) * 1.5))
            norm.bias.copy_(torch.randn(16, dtype=torch.float64))
    return m


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64),) for _ in range(n)]


def test_pairs_of_the_vit():
    names = [(a, c) for a, _, c, _ in ln_consumers(_vit())]
    assert names == [("blocks.0.norm1", "blocks.0.attn.qkv"),
                     ("blocks.0.norm2", "blocks.0.mlp.fc1"),
                     ("blocks.1.norm1", "blocks.1.attn.qkv"),
                     ("blocks.1.norm2", "blocks.1.mlp.fc1"),
                     ("norm", "head")]  # fmt: skip


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_function_is_unchanged(alpha):
    m = _vit()
    ref = copy.deepcopy(m)
    x = _batches(4)[3][0]
    spread = equalize_(m, _batches(), alpha)
    assert len(spread) == 5 and all(v > 1.0 for v in spread.values())
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-10)


def test_alpha_one_makes_channel_ranges_equal():
    m = _vit()
    consumers = [p[3] for p in ln_consumers(m)]
    before = channel_ranges(m, consumers, _batches(), 3)
    equalize_(m, _batches(), 1.0, max_batches=3)
    after = channel_ranges(m, consumers, _batches(), 3)
    for (lo0, hi0), (lo, hi) in zip(before, after, strict=True):
        half0, half = (hi0 - lo0) / 2, (hi - lo) / 2
        centre = (hi + lo) / 2
        assert half0.max() / half0.min() > 2  # the oracle discriminates
        torch.testing.assert_close(half, torch.full_like(half, float(half0.mean())))
        torch.testing.assert_close(centre, torch.full_like(centre, float(centre.mean())))


def test_alpha_zero_and_bad_alpha():
    m = _vit()
    ref = copy.deepcopy(m)
    assert equalize_(m, _batches(), 0.0) == {}
    for a, b in zip(m.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="alpha"):
        equalize_(m, _batches(), 1.5)


def test_per_tensor_quantization_error_falls():
    """At 4 bits, a per-tensor grid over the equalized qkv input loses less than over the raw
    one (measured in the raw input's units, through the exact inverse map)."""
    m = _vit()
    qkv = m.blocks[0].attn.qkv
    seen: dict[str, torch.Tensor] = {}
    h = qkv.register_forward_pre_hook(lambda _m, i: seen.__setitem__("x", i[0].detach()))
    x = _batches(1)[0][0]

    def err4(t: torch.Tensor, a: torch.Tensor) -> float:
        lo, hi = t.min(), t.max()
        s = (hi - lo) / 15
        q = torch.round((t - lo) / s) * s + lo
        return float((((q - t) * a) ** 2).mean())  # back in raw units: y = a (y' - c) + c_j

    with torch.no_grad():
        m(x)
        raw = seen["x"].clone()
        equalize_(m, [(x,)], 1.0, max_batches=1)
        m(x)
        eq = seen["x"]
    h.remove()
    lo, hi = raw.reshape(-1, 16).amin(0), raw.reshape(-1, 16).amax(0)
    half = (hi - lo) / 2
    fac = half / half.mean()
    assert err4(eq, fac) < 0.5 * err4(raw, torch.ones(16, dtype=raw.dtype))


class _SeqMLP(torch.nn.Sequential):
    """The common spelling of a ViT MLP: fc1 / GELU / fc2 as an nn.Sequential (no .fc1)."""


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_other_block_layouts_are_left_alone_not_an_error(alpha):
    m = _vit()
    for blk in m.blocks:
        blk.mlp = _SeqMLP(blk.mlp.fc1, torch.nn.GELU(), blk.mlp.fc2)
    x = _batches(1)[0][0]
    with torch.no_grad():
        before = m(x)
    spread = equalize_(m, _batches(), alpha)
    assert set(spread) == (set() if alpha == 0 else {"blocks.0.attn.qkv", "blocks.1.attn.qkv",
                                                     "head"})  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)
