"""Curvature of a model whose attention is ``F.scaled_dot_product_attention`` (PyTorch's and
``transformers``' default): the fused CPU kernel has no double backward and no forward AD;
hawq's passes run the math kernel, so traces work and equal a dense Hessian, and the
user's global SDPA setting is left alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.hessian.api import activation_traces, layer_traces


class SdpaBlock(nn.Module):
    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.head(o.transpose(1, 2).reshape(b, t, d).mean(1))


@pytest.mark.parametrize("backend", ["double_backward", "func"])
def test_traces_through_sdpa_equal_the_dense_hessian(backend):
    torch.manual_seed(0)
    model = SdpaBlock().double().eval()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    got = layer_traces(model, loss_fn, [(x, y)], max_samples=100, min_samples=20, rtol=0.05,
                       estimator="sandwich", sketch=16, backend=backend)  # fmt: skip
    for name in ("qkv", "head"):
        w = model.get_submodule(name).weight
        params = dict(model.named_parameters())

        def loss_of(wv, name=name, params=params):
            out = torch.func.functional_call(model, {**params, f"{name}.weight": wv}, (x,))
            return loss_fn(out, y)

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            dense = torch.autograd.functional.hessian(loss_of, w.detach())
        exact = float(dense.reshape(w.numel(), w.numel()).diagonal().sum())
        e = got[name]
        assert abs(e.mean - exact) <= 4 * e.stderr + 1e-9 * abs(exact), (name, e, exact)
    acts = activation_traces(model, loss_fn, [(x, y)], max_samples=20)
    assert set(acts) == {"qkv", "head"}
    assert torch.backends.cuda.flash_sdp_enabled()  # the global setting is untouched
