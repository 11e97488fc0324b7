"""Loss-landscape oracles: quadratic toy models against dense Hessians, filter normalisation,
quantization offsets against the fake-quant forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from hawq.analysis import (
    LossProbe,
    eigen_directions,
    filter_normalized,
    op_parameters,
    op_quant_rise,
    project,
    quant_offset,
    quant_point,
    second_order,
    shifted,
    spearman,
    surface_1d,
    surface_2d,
)
from hawq.quant import calibrate, quantize_
from hawq.quant.plan import OpSetting, Plan

D64 = torch.float64
OUT_W = torch.tensor([1.0, 2.0, 3.5], dtype=D64)


def wmse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Output-weighted MSE: distinct weights keep the Hessian's top eigenvalues simple."""
    return ((out - y) ** 2 * OUT_W).mean()


class TwoLinear(nn.Module):
    """``f(x) = A x + B x``: MSE is quadratic in (A, B) jointly; two quantizable ops."""

    def __init__(self, d_in: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, d_out, bias=False)
        self.b = nn.Linear(d_in, d_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def toy(seed: int = 0, n: int = 32) -> tuple[nn.Module, list]:
    g = torch.Generator().manual_seed(seed)
    model = TwoLinear().to(D64).eval()
    x = torch.randn(n, 4, generator=g, dtype=D64)
    y = torch.randn(n, 3, generator=g, dtype=D64)
    return model, [(x, y)]


def dense_hessian(model: nn.Module, batches: list, names: list[str]) -> torch.Tensor:
    """Dense Hessian of the MSE over the flat concatenation of ``names`` (oracle)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes)]
        out = functional_call(model, {**params, **dict(zip(names, chunks))}, (batches[0][0],))
        return wmse(out, batches[0][1])

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return hessian(loss)(flat)


def to_minimum(model: nn.Module, batches: list) -> None:
    """Least-squares fit of ``b`` (weight and bias) with ``a = 0``: a minimum of the loss."""
    x, y = batches[0]
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=D64)], dim=1)
    sol = torch.linalg.lstsq(xa, y).solution  # (5, 3)
    with torch.no_grad():
        model.a.weight.zero_()
        model.b.weight.copy_(sol[:4].T)
        model.b.bias.copy_(sol[4])


def test_surface_along_eigenvector_is_the_quadratic_oracle():
    model, batches = toy()
    to_minimum(model, batches)
    loss_fn = wmse
    names = list(op_parameters(model))
    dense = dense_hessian(model, batches, names)
    evals = torch.linalg.eigvalsh(dense)
    top = evals[evals.abs().argsort(descending=True)][:2]
    ed = eigen_directions(model, loss_fn, batches, top_k=2, tol=1e-10, max_iter=60)
    assert ed.values == pytest.approx(top.tolist(), rel=1e-8)
    probe = LossProbe(batches, loss_fn)
    l0, acc = probe(model)
    assert math.isnan(acc)  # regression targets: no accuracy
    ts = [-2.0, -0.5, 0.0, 0.3, 1.7]
    for lam, d in zip(ed.values, ed.directions):
        flat = torch.cat([d[n].reshape(-1) for n in names])
        assert float(flat.norm()) == pytest.approx(1.0, rel=1e-10)
        assert torch.allclose(dense @ flat, lam * flat, atol=1e-8)
        got = surface_1d(model, probe, d, ts)["loss"]
        assert got == pytest.approx([l0 + 0.5 * lam * t * t for t in ts], rel=1e-10, abs=1e-12)
    # the 2D surface on (u1, u2) adds the two parabolas (no cross term between eigenvectors)
    al, be = [-1.0, 0.0, 0.5], [-0.3, 0.0, 1.1]
    grid = surface_2d(model, probe, *ed.directions, al, be)["loss"]
    l1, l2 = ed.values
    for i, b in enumerate(be):
        for j, a in enumerate(al):
            assert grid[i][j] == pytest.approx(l0 + 0.5 * (l1 * a * a + l2 * b * b), rel=1e-10)


def test_off_minimum_second_order_model_is_exact_for_a_quadratic_loss():
    model, batches = toy(seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = wmse
    probe = LossProbe(batches, loss_fn)
    params = op_parameters(model)
    names = list(params)
    g = torch.Generator().manual_seed(3)
    delta = {n: 0.3 * torch.randn(p.shape, generator=g, dtype=D64) for n, p in params.items()}
    lin, quad = second_order(model, loss_fn, batches, delta)
    flat = torch.cat([delta[n].reshape(-1) for n in names])
    dense = dense_hessian(model, batches, names)
    assert quad == pytest.approx(float(flat @ dense @ flat), rel=1e-10)
    l0, _ = probe(model)
    for t in (0.5, 1.0, -1.5):
        got = surface_1d(model, probe, delta, [t])["loss"][0]
        assert got == pytest.approx(l0 + t * lin + 0.5 * t * t * quad, rel=1e-10)
    # per op: rise == g_l.delta_l + 0.5 delta_l H_ll delta_l, and lambda of H_ll matches dense
    only_w = {n: v for n, v in delta.items() if n.endswith("weight")}
    rows = op_quant_rise(model, probe, only_w, eig_max_iter=40, eig_tol=1e-10)
    assert set(rows) == {"a", "b"}
    for op, r in rows.items():
        assert r["rise"] == pytest.approx(r["predicted"], rel=1e-9, abs=1e-12)
        i = names.index(f"{op}.weight")
        start = sum(params[n].numel() for n in names[:i])
        blk = dense[start:start + params[names[i]].numel(), start:start + params[names[i]].numel()]
        lam = torch.linalg.eigvalsh(blk).abs().max()
        assert abs(r["lambda"]) == pytest.approx(float(lam), rel=1e-8)
        v = only_w[f"{op}.weight"].reshape(-1)
        assert r["curvature"] == pytest.approx(float(v @ blk @ v / (v @ v)), rel=1e-9)
    # the weights are restored exactly after every shifted evaluation
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_block_eigendirection_is_embedded_with_zeros_elsewhere():
    model, batches = toy(seed=2)
    ed = eigen_directions(model, wmse, batches, top_k=1, op="b", tol=1e-10, max_iter=40)
    d = ed.directions[0]
    assert ed.scope == "b"
    assert torch.count_nonzero(d["a.weight"]) == 0
    names = ["b.weight", "b.bias"]
    dense = dense_hessian(model, batches, names)
    top = torch.linalg.eigvalsh(dense).abs().max()
    assert abs(ed.values[0]) == pytest.approx(float(top), rel=1e-8)


def test_filter_normalisation_matches_filter_norms():
    conv = nn.Conv2d(3, 5, 3)
    lin = nn.Linear(7, 4)
    weights = {"c.weight": conv.weight, "c.bias": conv.bias, "l.weight": lin.weight,
               "l.bias": lin.bias}  # fmt: skip
    d = filter_normalized(weights, seed=0)
    for name in ("c.weight", "l.weight"):
        w = weights[name].detach()
        assert d[name].shape == w.shape and d[name].dtype == w.dtype
        torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
        assert not torch.allclose(d[name] / w.norm(), w / w.norm())  # random, not the weight
    assert torch.count_nonzero(d["c.bias"]) == 0 and torch.count_nonzero(d["l.bias"]) == 0
    again, other = filter_normalized(weights, seed=0), filter_normalized(weights, seed=1)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["l.weight"], other["l.weight"])


def test_projection_and_outside_share():
    model, batches = toy()
    probe = LossProbe(batches, wmse)
    g = torch.Generator().manual_seed(0)
    params = op_parameters(model)
    d1 = {n: torch.randn(p.shape, generator=g, dtype=D64) for n, p in params.items()}
    d2 = {n: torch.randn(p.shape, generator=g, dtype=D64) for n, p in params.items()}
    inside = {n: 2.0 * d1[n] - 0.5 * d2[n] for n in d1}
    pt = quant_point(model, probe, inside, {"d1": d1, "d2": d2})
    assert pt["outside"] == pytest.approx(0.0, abs=1e-7)
    assert pt["loss"] == pytest.approx(surface_1d(model, probe, inside, [1.0])["loss"][0])
    assert project(d1, d1) == pytest.approx(1.0)
    pt = quant_point(model, probe, d1, {"d2": d2})
    cos = project(d1, d2) * math.sqrt(sum(float((v * v).sum()) for v in d2.values()))
    cos /= math.sqrt(sum(float((v * v).sum()) for v in d1.values()))
    assert pt["outside"] == pytest.approx(math.sqrt(1 - cos**2), rel=1e-9)


@pytest.mark.parametrize("bits", [2, 4])
def test_quant_offset_reproduces_the_fake_quant_forward(bits):
    model, batches = toy()
    q = quantize_(_copy(model), Plan(default=OpSetting(w_bits=bits, a_bits=None)))
    calibrate(q, [], 0)
    delta = quant_offset(q)
    assert set(delta) == {"a.weight", "b.weight"}
    x = batches[0][0]
    with shifted(model, [(1.0, delta)]):
        torch.testing.assert_close(model(x), q(x))
    assert max(float(v.abs().max()) for v in delta.values()) > 0


def test_quant_offset_unfolds_batchnorm():
    """Conv + BN quantized with BN folded: the FP conv at W + delta equals the folded model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[1] = 0.0  # a dead channel: offset 0
    model.eval()
    q = quantize_(_copy(model), Plan(default=OpSetting(w_bits=3, a_bits=None)), fold_bn=True)
    calibrate(q, [], 0)
    assert isinstance(q[1], nn.Identity)  # folded
    delta = quant_offset(q)
    assert torch.count_nonzero(delta["0.weight"][1]) == 0
    x = torch.randn(5, 3, 8, 8)
    with shifted(model, [(1.0, delta)]):
        torch.testing.assert_close(model(x), q(x), rtol=1e-4, atol=1e-5)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 25, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
