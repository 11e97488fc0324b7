"""The batched INT8 attention-matmul kernel: bit-exact with the reference backend.

On a CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``); with CUDA the same tests compile it.
"""

from __future__ import annotations

import pytest
import torch

from hawq.integer import ops
from hawq.integer.convert import convert
from hawq.integer.dyadic import Requant
from hawq.integer.graph import steps
from tests.integer.cases import fake_quant, tiny_vit

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (a shape, b shape, b as a transposed view of a contiguous (..., N, K) tensor)
SHAPES = [
    ((2, 3, 65, 64), (2, 3, 64, 65), True),  # q @ k^T
    ((2, 3, 65, 65), (2, 3, 65, 64), False),  # attn @ v
    ((3, 33, 100), (3, 100, 17), False),  # 3-d, two K tiles
    ((65, 64), (64, 65), True),  # 2-d
]
ZERO_POINTS = [(0, 0), (-128, 0), (3, -7)]


def _codes(shape, g, transposed=False) -> torch.Tensor:
    if transposed:  # (..., K, N) view of a contiguous (..., N, K) tensor, as k.transpose(-2, -1)
        return _codes((*shape[:-2], shape[-1], shape[-2]), g).transpose(-2, -1)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


def _requants(n: int, g) -> list[Requant | None]:
    per_col = Requant.from_scale(torch.rand(n, generator=g, dtype=torch.float64) * 2e-3,
                                 torch.randint(-20, 20, (n,), generator=g), -100, 127)  # fmt: skip
    return [None, Requant.from_scale(1e-3, 5), per_col]


def _triton(a, b, za, zb, rq) -> torch.Tensor:
    with ops.backend("triton"):
        return ops.int_matmul(a.to(DEV), b.to(DEV), za, zb, rq).cpu()


@pytest.mark.parametrize("zp", ZERO_POINTS, ids=str)
@pytest.mark.parametrize("sa,sb,transposed", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_bmm_bit_exact_with_reference(sa, sb, transposed, zp):
    g = torch.Generator().manual_seed(sum(sa) + zp[0])
    a, b = _codes(sa, g), _codes(sb, g, transposed)
    assert b.is_contiguous() != transposed
    for rq in _requants(sb[-1], g):
        ref = ops.int_matmul(a, b, *zp, rq)
        assert ref.dtype == (rq.out_dtype if rq else torch.int32)
        assert torch.equal(_triton(a, b, *zp, rq), ref)


def test_bmm_rejects_broadcast_and_wide_operands():
    a = torch.zeros(2, 3, 8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="leading dims"):
        _triton(a, torch.zeros(3, 16, 8, dtype=torch.int8), 0, 0, None)
    with pytest.raises(ValueError, match="int8"):
        _triton(a, torch.zeros(2, 3, 16, 8, dtype=torch.int16), 0, 0, None)


def test_integer_vit_attention_bit_exact_across_backends(monkeypatch):
    """The tiny integer ViT: forward_int with every attention matmul on the kernel."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    im = convert(fake_quant(tiny_vit(), x), [(x,)])
    attention = [m for m in im.steps.modules() if isinstance(m, steps.Attention)]
    assert len(attention) == 2 and any(a.zp != 0 for a in attention)  # shifted softmax grid
    from hawq.integer import triton_bmm

    calls, kernel = [], triton_bmm.bmm_requant

    def spy(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(triton_bmm, "bmm_requant", spy)
    xq = im.quantize_input(x[:2])
    ref = im.forward_int(xq)
    with ops.backend("triton"):
        got = im.to(DEV).forward_int(xq.to(DEV)).cpu()
    assert len(calls) == 2 * len(attention)
    assert torch.equal(got, ref)


@pytest.mark.gpu
def test_compiled_kernel_at_seed_vit_attention_shapes():
    """Batch 64, 8 heads, 65 tokens, head dim 64, q/k/v as strided slices of one qkv."""
    g = torch.Generator().manual_seed(7)
    qkv = torch.randint(-128, 128, (64, 65, 3, 8, 64), generator=g, dtype=torch.int8)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (64, 8, 65, 64), non-contiguous
    p = torch.randint(-128, 128, (64, 8, 65, 65), generator=g, dtype=torch.int8)
    rq = Requant.from_scale(2e-4, 3)
    assert torch.equal(_triton(q, k.transpose(-2, -1), 3, -7, None),
                       ops.int_matmul(q, k.transpose(-2, -1), 3, -7))  # fmt: skip
    assert torch.equal(_triton(p, v, -128, 0, rq), ops.int_matmul(p, v, -128, 0, rq))
