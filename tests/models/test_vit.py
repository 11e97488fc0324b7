import torch

from hawq.models import MatMul, ViT, op_inventory, quantizable_ops

SEED_VIT = dict(dim=512, depth=6, heads=8, mlp_dim=512, dropout=0.1)


def expected_names(depth: int) -> list[str]:
    names = ["patch_embed"]
    for i in range(depth):
        names += [f"blocks.{i}.attn.{n}" for n in ("qkv", "qk", "av", "proj")]
        names += [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    return names + ["head"]


def test_seed_vit_has_38_named_ops_in_execution_order():
    model = ViT(**SEED_VIT)
    inv = op_inventory(model)
    assert [op.name for op in inv] == expected_names(6)
    assert len(inv) == 38
    assert sum(isinstance(m, MatMul) for m in quantizable_ops(model).values()) == 12
    assert 9.4e6 < sum(p.numel() for p in model.parameters()) < 9.6e6


def test_seed_vit_macs_by_hand():
    inv = {op.name: op for op in op_inventory(ViT(**SEED_VIT))}
    t, d = 65, 512  # 64 patches + class token
    assert inv["patch_embed"].macs == 64 * 48 * d  # the class token is not embedded
    assert inv["blocks.0.attn.qkv"].macs == t * d * 3 * d
    assert inv["blocks.0.attn.qk"].macs == 8 * t * t * 64  # heads x T x T x head_dim
    assert inv["blocks.3.attn.av"].macs == 8 * t * t * 64
    assert inv["blocks.5.attn.proj"].macs == t * d * d
    assert inv["blocks.1.mlp.fc1"].macs == t * d * 512
    assert inv["head"].macs == d * 10  # class token only
    assert inv["blocks.0.attn.qkv"].params == d * 3 * d + 3 * d
    assert inv["blocks.0.attn.qk"].params == 0


def test_macs_scale_with_input_size():
    model = ViT(image_size=16, patch_size=4, dim=32, depth=1, heads=2, mlp_dim=32, dropout=0.0)
    inv = {op.name: op.macs for op in op_inventory(model, (3, 16, 16))}
    assert inv["blocks.0.attn.qkv"] == 17 * 32 * 96


def test_ops_are_swappable_by_name():
    model = ViT(dim=32, depth=1, heads=2, mlp_dim=32, dropout=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)

    class Twice(MatMul):
        def forward(self, a, b):
            return 2 * super().forward(a, b)

    model.blocks[0].attn.av = Twice()
    assert "blocks.0.attn.av" in quantizable_ops(model)
    assert not torch.allclose(model(x), ref)


def test_attention_supports_double_backward():
    model = ViT(dim=16, depth=1, heads=2, mlp_dim=16, dropout=0.0).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    loss = model(x).square().sum()
    w = model.blocks[0].attn.qkv.weight
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (hv,) = torch.autograd.grad(g, w, grad_outputs=torch.ones_like(g))
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0
