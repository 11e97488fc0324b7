"""The user's own model through a config (hawq.models.own) and the ordinary-way zoo."""

import copy

import pytest
import torch
from torch import nn

from hawq.checkpoint import build_model, load_model, save_model
from hawq.errors import HawqError
from hawq.models import zoo
from hawq.models.capture import prepare
from hawq.models.ops import quantizable_ops

ZOO = {
    "torch_vit": lambda: zoo.TorchViT(dim=32, depth=2, heads=2, mlp_dim=64),
    "torch_vit_post_norm": None,  # built below: norm_first=False, dropout on
    "sdpa_vit": lambda: zoo.SdpaViT(dim=32, depth=2, heads=2, mlp_dim=64),
    "matmul_vit": lambda: zoo.SdpaViT(dim=32, depth=2, heads=2, mlp_dim=64, use_sdpa=False),
    "cnn": lambda: zoo.SmallCNN(width=8),
}


def _post_norm() -> nn.Module:
    m = zoo.TorchViT(dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, 0.0, activation="relu", batch_first=True,
                                       norm_first=False)  # fmt: skip
    m.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return m


ZOO["torch_vit_post_norm"] = _post_norm


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(ZOO))
def test_prepared_model_trains_exactly_like_the_original(name):
    """Every trainable parameter stays trainable and one SGD step moves the prepared model
    exactly as it moves the original (a frozen copy of a weight would show here)."""
    torch.manual_seed(0)
    original = ZOO[name]()
    prepared, report = prepare(original, images(2), strict=True)
    assert report.share == 1.0
    assert trainable(prepared) == trainable(original) > 0
    x, y = images(8, seed=1), torch.arange(8) % 10
    for model in (original, prepared):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
    original.eval(), prepared.eval()
    torch.testing.assert_close(prepared(x), original(x), rtol=1e-4, atol=1e-4)


def _cfg(model: dict, **kw) -> dict:
    return {"_target_": "hawq.models.own.prepared", "model": model, **kw}


def test_config_built_model_round_trips_through_a_checkpoint(tmp_path):
    cfg = _cfg({"_target_": "hawq.models.zoo.TorchViT", "dim": 32, "depth": 2, "heads": 2,
                "mlp_dim": 64})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    ops = list(quantizable_ops(model))
    assert "encoder.layers.1.self_attn.qk" in ops and len(ops) == 18
    assert model.hawq_capture.share == 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the checkpoint must carry it
    save_model(tmp_path / "m.pt", model, cfg)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert list(quantizable_ops(loaded)) == ops
    model.eval(), loaded.eval()
    assert torch.equal(loaded(images()), model(images()))


def test_min_share_refuses_a_model_that_leaves_products_float():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3 * 32 * 32, 10))

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
                return x.flatten(1) @ self.w
            return x.flatten(1)

    from hawq.models.own import prepared

    with pytest.raises(HawqError, match="below model.min_share=1.0; left float"):
        prepared(Untraceable())
    assert prepared(Untraceable(), min_share=0.0).hawq_capture.share == 0.0


def test_bad_builds_are_one_line():
    from hawq.models.own import prepared

    with pytest.raises(HawqError, match="allowed: an nn.Module"):
        prepared(copy.deepcopy)  # not a module
    with pytest.raises(HawqError, match="min_share"):
        prepared(zoo.SmallCNN(), min_share=2.0)


def test_a_token_model_is_prepared_on_ids_from_its_config(tmp_path):
    """``prepare.input_dtype: int64`` + ``vocab_size``: the example is token ids, so the
    embedding-first model traces, and the op probes (inventory, MACs) feed ids too."""
    from hawq.models.ops import op_inventory

    class Tokens(nn.Module):
        def __init__(self, vocab: int = 30, dim: int = 16) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.fc((h.transpose(1, 2) @ h).mean(1))  # a product of activations

    import sys

    sys.modules[__name__].Tokens = Tokens  # reachable by _target_
    prep = {"input_shape": [9], "input_dtype": "int64", "vocab_size": 30}
    cfg = {"_target_": f"{__name__}.Tokens", "prepare": prep}
    model = build_model(cfg)
    assert model.hawq_capture.share == 1.0 and set(quantizable_ops(model)) == {"fc", "matmul"}
    macs = {o.name: o.macs for o in op_inventory(model, (9,))}
    assert macs == {"matmul": 16 * 9 * 16, "fc": 16 * 3}
    save_model(tmp_path / "m.pt", model, cfg)
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.randint(0, 30, (4, 9))
    assert torch.equal(loaded(x), model(x))
    for bad, match in (({"input_dtype": "int64"}, "vocab_size"),
                       ({"input_dtype": "complex64"}, "input_dtype"),
                       ({"input_dtype": "nonsense"}, "input_dtype")):  # fmt: skip
        with pytest.raises(HawqError, match=match):
            build_model({**cfg, "prepare": {**prep, "vocab_size": None, **bad}})
