"""Block reconstruction PTQ: rounding vs brute force, weights on the grid, errors that only fall."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from hawq.config import typed
from hawq.errors import HawqError
from hawq.models import ResNet, ViT
from hawq.quant import Plan, calibrate, load_quantized, quant_ops, quantize_, save_quantized
from hawq.quant.config import QuantConfig
from hawq.quant.reconstruct import ReconstructSettings, reconstruct_, unit_of, units

FAST = dict(iters=60, batch_size=32)


def tiny_vit() -> ViT:
    return ViT(image_size=8, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=48, dropout=0.0)


def tiny_resnet() -> ResNet:
    return ResNet(depth=8, width=8)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _ptq(model: nn.Module, plan: dict, calib: torch.Tensor) -> nn.Module:
    quantize_(model.eval(), Plan.from_dict(plan), None, True)
    calibrate(model, [(calib,)])
    return model.eval()


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_units_follow_blocks_and_lone_layers():
    vit = _ptq(tiny_vit(), {"_default": {"w_bits": 4, "a_bits": 4}}, _images(8, 0))
    got = units(vit)
    assert list(got) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert got["blocks.1"] == [f"blocks.1.{n}" for n in
                               ("attn.qkv", "attn.qk", "attn.av", "attn.proj", "mlp.fc1",
                                "mlp.fc2")]  # fmt: skip
    res = tiny_resnet()
    assert unit_of(res, "layer2.0.conv1") == "layer2.0"
    assert unit_of(res, "conv1") == "conv1"
    seq = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
    assert unit_of(seq, "0") == "0" and unit_of(seq, "1.0") == "1"


def _rows_sq_err(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error of each output row of ``x @ w.T`` vs ``y``, summed over the samples."""
    return (x @ w.T - y).pow(2).sum(0)


def _gap_closed(seed: int) -> float:
    """One Linear, 3-bit per-channel weights, FP inputs, strongly correlated features: the
    fraction of the gap between nearest rounding and the brute-force optimum (every
    floor/ceil choice of each row, 2^6) that reconstruction closes; asserts it is never
    worse than nearest rounding in total and never below the optimum on a row."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 6, 3
    x = torch.randn(512, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g)
    fp = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        fp[0].weight.copy_(torch.randn(d_out, d_in, generator=g))
    q = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 3, "a_bits": None}}, x)
    wq = q[0].w_quant
    s, w = wq.scale.detach(), fp[0].weight.detach()
    with torch.no_grad():
        y = fp(x)
        nearest = _rows_sq_err(wq(w), x, y)
        best = torch.full((d_out,), float("inf"))
        lo = torch.floor(w / s)
        for bits in itertools.product((0.0, 1.0), repeat=d_in):
            cand = (lo + torch.tensor(bits)).clamp(wq.q_min, wq.q_max) * s
            best = torch.minimum(best, _rows_sq_err(cand, x, y))
    # lambda sums over weights: 18 of them need a larger one than a block's ~10^5 (BRECQ: 0.01)
    st = ReconstructSettings(iters=1500, batch_size=64, reg=0.2, learn_bias=False, drop=0.0,
                             seed=seed)  # fmt: skip
    reconstruct_(q, fp, x, st)
    with torch.no_grad():
        got = _rows_sq_err(q[0].w_quant(q[0].weight), x, y)
    assert float(got.sum()) <= float(nearest.sum()) * (1 + 1e-5), seed  # kept only if better
    assert torch.all(got >= best * (1 - 1e-5)), seed  # the enumeration is the optimum
    gap = float((nearest - best).sum())
    assert gap > 1e-3 * float(nearest.sum()), seed  # the oracle discriminates
    return float((nearest - got).sum()) / gap


def test_rounding_closes_most_of_the_gap_to_the_brute_force_optimum():
    closed = [_gap_closed(seed) for seed in range(6)]
    assert sum(closed) / len(closed) >= 0.5, closed
    assert max(closed) > 0.99, closed  # some problems are solved exactly


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_weights_end_on_their_grid_and_state_keys_stay(kind):
    torch.manual_seed(0)
    fp = tiny_vit() if kind == "vit" else tiny_resnet()
    if kind == "resnet":
        _randomize_bn(fp)
    fp.eval()
    calib = _images(64, 1)
    q = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 3, "a_bits": 4}}, calib)
    keys = {k: getattr(v, "shape", v) for k, v in q.state_dict().items()}
    steps = {n: op.a_quant.scale.clone() for n, op in quant_ops(q).items()}
    before = copy.deepcopy(q.state_dict())
    report = reconstruct_(q, fp, calib, ReconstructSettings(**FAST))
    assert {k: getattr(v, "shape", v) for k, v in q.state_dict().items()} == keys
    kept = {op for row in report.values() if row["kept"] for op in row["ops"]}
    assert kept, "no unit kept: nothing of the property below was checked"
    moved = 0
    for name, op in quant_ops(q).items():
        if name not in kept:  # a unit that got worse is the calibrated PTQ state, bit for bit
            for k, v in op.state_dict().items():
                old = before[f"{name}.{k}"]
                assert torch.equal(v, old) if torch.is_tensor(v) else v == old, f"{name}.{k}"
            continue
        moved += int(not torch.equal(op.a_quant.scale, steps[name]))
        assert bool((op.a_quant.scale > 0).all()), name
        if not hasattr(op, "w_quant"):
            continue  # a @ b: no weight
        w = op.folded()[0] if hasattr(op, "folded") else op.weight
        with torch.no_grad():
            wq = op.w_quant(w)
        s = op.w_quant.scale
        # on the grid: fake-quantizing the stored weight changes it by rounding noise only
        assert torch.equal(torch.round(w / s), torch.round(wq / s)), name
        torch.testing.assert_close(wq, w, rtol=1e-5, atol=1e-6 * float(s.max()))
    assert moved > 0  # activation step sizes were learned


def test_errors_only_fall_and_the_network_gets_closer_to_fp():
    torch.manual_seed(0)
    fp = tiny_vit().eval()
    calib, held = _images(128, 1), _images(64, 2)
    plain = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 3, "a_bits": 3}}, calib)
    rec = copy.deepcopy(plain).train()
    fp_state = copy.deepcopy(fp.state_dict())
    flags = {n: p.requires_grad for n, p in rec.named_parameters()}
    report = reconstruct_(rec, fp, calib, ReconstructSettings(iters=150, batch_size=32))
    assert rec.training and not fp.training  # modes restored
    assert {n: p.requires_grad for n, p in rec.named_parameters()} == flags
    assert all(torch.equal(v, fp_state[k]) for k, v in fp.state_dict().items())  # FP untouched
    rec.eval()
    assert all(r["after"] <= r["before"] for r in report.values())
    assert sum(r["after"] for r in report.values()) < 0.9 * sum(r["before"] for r in
                                                                report.values())  # fmt: skip
    with torch.no_grad():
        ref = fp(held)
        err_plain = (plain(held) - ref).pow(2).mean()
        err_rec = (rec(held) - ref).pow(2).mean()
    assert err_rec < err_plain  # on images it never saw


def test_a_unit_that_gets_worse_is_restored_exactly():
    torch.manual_seed(0)
    fp = tiny_vit().eval()
    calib = _images(64, 1)
    q = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 4, "a_bits": 4}}, calib)
    before = copy.deepcopy(q.state_dict())
    bad = ReconstructSettings(iters=20, lr=0.0, act_lr=0.0, bias_lr=1.0, reg=0.0)
    report = reconstruct_(q, fp, calib, bad)  # biases thrown around by lr 1: worse everywhere
    assert not any(r["kept"] for r in report.values())
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_dynamic_quantizers_stay_dynamic_and_only_biases_learn():
    """The seed's per-call min/max (weights and activations dynamic): no qparam to learn."""
    torch.manual_seed(0)
    fp = tiny_vit().eval()
    calib = _images(64, 1)
    q = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 3, "a_bits": 4, "dynamic": True,
                                              "granularity": "per_tensor", "symmetric": False,
                                              "a_symmetric": False}}, calib)  # fmt: skip
    w0 = {n: (op.weight.clone(), op.bias.clone()) for n, op in quant_ops(q).items()
          if hasattr(op, "weight")}  # fmt: skip
    report = reconstruct_(q, fp, calib, ReconstructSettings(iters=50))
    assert all(r["learned"] == 0 for r in report.values())
    assert all(op.a_quant.dynamic for op in quant_ops(q).values())
    assert all(torch.equal(q.get_submodule(n).weight, w) for n, (w, _) in w0.items())
    kept = [u for u, r in report.items() if r["kept"]]
    assert any(not torch.equal(q.get_submodule(n).bias, b) for n, (_, b) in w0.items()
               if n.startswith(tuple(kept)))  # fmt: skip


def test_checkpoint_round_trip_and_integer_conversion(tmp_path):
    from hawq.integer.convert import convert

    torch.manual_seed(0)
    fp = tiny_vit().eval()
    calib = _images(64, 1)
    plan = {"_default": {"w_bits": 4, "a_bits": 8}}
    q = _ptq(copy.deepcopy(fp), plan, calib)
    reconstruct_(q, fp, calib, ReconstructSettings(**FAST))
    path = tmp_path / "q.pt"
    cfg = {"_target_": "hawq.models.vit.ViT", "image_size": 8, "patch_size": 4, "dim": 32,
           "depth": 2, "heads": 2, "mlp_dim": 48, "dropout": 0.0}
    save_quantized(path, q, cfg, Plan.from_dict(plan))
    back, _, _ = load_quantized(path)
    x = _images(16, 5)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), q(x))
        im = convert(q, [(calib,)])
        ref, out = q(x), im(x)
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(HawqError, match=r"quant\.reconstruct\.drop"):
        typed({"reconstruct": {"drop": 1.0}}, QuantConfig, "quant")
    with pytest.raises(HawqError, match=r"quant\.reconstruct\.iters"):
        typed({"reconstruct": {"iters": 0}}, QuantConfig, "quant")
    fp = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(HawqError, match="no quantized ops"):
        reconstruct_(copy.deepcopy(fp), fp, torch.randn(4, 3))


def test_lsq_quantizers_of_a_qat_model_are_reconstructed_too():
    torch.manual_seed(0)
    fp = tiny_vit().eval()
    calib = _images(64, 1)
    q = copy.deepcopy(fp)
    quantize_(q, Plan.from_dict({"_default": {"w_bits": 3, "a_bits": 3}}), "lsq", True)
    calibrate(q, [(calib,)])
    steps = {n: op.a_quant.scale.detach().clone() for n, op in quant_ops(q).items()}
    report = reconstruct_(q, fp, calib, ReconstructSettings(iters=100))
    assert sum(r["after"] for r in report.values()) < sum(r["before"] for r in report.values())
    for op in quant_ops(q).values():
        assert isinstance(op.a_quant.scale, nn.Parameter) and op.a_quant.scale.requires_grad
        if hasattr(op, "w_quant"):
            s = op.w_quant.scale.detach()
            assert torch.equal(torch.round(op.weight / s), torch.round(op.w_quant(op.weight) / s))
    assert any(not torch.equal(op.a_quant.scale.detach(), steps[n])
               for n, op in quant_ops(q).items())  # fmt: skip


class _TupleBlock(nn.Module):
    """A block returning ``(hidden, aux)`` and one returning a dict (``ModelOutput``-like)."""

    def __init__(self, d: int, as_dict: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.as_dict = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), as_dict

    def forward(self, x):
        h = x + self.fc2(torch.relu(self.fc1(x)))
        if self.as_dict:
            return {"last_hidden_state": h, "pooled": h.mean(1), "ids": torch.zeros(1).long()}
        return h, h.mean(1)


class _StructuredNet(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_TupleBlock(d, False), _TupleBlock(d, True)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h, _ = self.blocks[0](x)
        return self.head(self.blocks[1](h)["last_hidden_state"].mean(1))


def test_units_returning_tuples_and_dicts_are_reconstructed():
    torch.manual_seed(0)
    fp = _StructuredNet().eval()
    calib = torch.randn(64, 5, 8, generator=torch.Generator().manual_seed(1))
    q = _ptq(copy.deepcopy(fp), {"_default": {"w_bits": 3, "a_bits": 4}}, calib)
    report = reconstruct_(q, fp, calib, ReconstructSettings(iters=40, batch_size=16))
    assert set(report) == {"blocks.0", "blocks.1", "head"}
    assert all(r["after"] <= r["before"] for r in report.values())
    assert any(r["kept"] and r["after"] < r["before"] for r in report.values())


class _StopAfter(Exception):
    pass


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("stop_after", [1, 2])
def test_a_stopped_reconstruction_resumes_to_the_uninterrupted_result(kind, stop_after, tmp_path):
    """Stopped after any unit (the state saved through the safe loader), resumed on a freshly
    quantized and calibrated model: the same state dict, bit for bit, and the same report."""
    from hawq.io import load_torch, save_torch

    torch.manual_seed(0)
    fp = tiny_vit() if kind == "vit" else tiny_resnet()
    if kind == "resnet":
        _randomize_bn(fp)
    fp.eval()
    calib, plan = _images(64, 1), {"_default": {"w_bits": 3, "a_bits": 4}}
    st = ReconstructSettings(**FAST)
    whole = _ptq(copy.deepcopy(fp), plan, calib)
    want = reconstruct_(whole, fp, calib, st)
    assert len(want) > stop_after
    path, seen = tmp_path / "state.pt", []

    def save_then_stop(state):
        save_torch(path, state)
        seen.append(len(state["report"]))
        if len(seen) == stop_after:
            raise _StopAfter

    with pytest.raises(_StopAfter):
        reconstruct_(_ptq(copy.deepcopy(fp), plan, calib), fp, calib, st, on_unit=save_then_stop)
    torch.manual_seed(123)  # whatever ran in between: the state restores the streams
    resumed = _ptq(copy.deepcopy(fp), plan, calib)
    got = reconstruct_(resumed, fp, calib, st, resume=load_torch(path))
    for k, v in whole.state_dict().items():
        r = resumed.state_dict()[k]
        assert torch.equal(r, v) if isinstance(v, torch.Tensor) else r == v, k
    strip = lambda r: {u: {k: v for k, v in row.items() if k != "seconds"} for u, row in r.items()}  # noqa: E731
    assert strip(got) == strip(want)
