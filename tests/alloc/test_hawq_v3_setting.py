"""HAWQ-V3 exactly beside ours (issue 15 item 4) and the one-pass, cached calibration
(item 6): ``hawq_v3`` is the weight-only objective ``sum Tr(H_i)/n_i ||Q(W_i) - W_i||^2``
with whole-layer ties; ``hawq_v3_act`` adds activation terms and ties activations only;
bits.yaml and the configs say which."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hawq.alloc import Candidate, Problem, allocate, brute_force, read_hessian, solve
from hawq.alloc.config import AllocConfig
from hawq.alloc.quant_error import activation_errors
from hawq.alloc.sensitivity import SETTINGS
from hawq.models import quantizable_ops
from hawq.pipeline import run_pipeline
from hawq.quant.plan import OpSetting, load_plan

from .cases import SETTINGS as CANDS
from .cases import tiny_vit, write_report

REPO = Path(__file__).resolve().parents[2]


def _per_channel_error(w: torch.Tensor, bits: int) -> float:
    """Symmetric signed per-output-channel min/max grid, written out."""
    w = w.detach().double().reshape(w.shape[0], -1)
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = w.abs().amax(1, keepdim=True) / ((q_max - q_min) / 2)
    return float(((torch.clamp(torch.round(w / s), q_min, q_max) * s - w) ** 2).sum())


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3") / "hessian.json"
    model = tiny_vit()
    write_report(model, path)
    return model, read_hessian(path)


def test_hawq_v3_is_the_weight_only_objective(vit_report):
    model, report = vit_report
    cands = [{"w_bits": w, "a_bits": a} for w in (2, 4, 8) for a in (4, 8)]
    alloc = allocate(report, cands, "hawq_v3", {}, model=model,
                     base=OpSetting(granularity="per_channel"))  # fmt: skip (no images needed)
    mods = dict(model.named_modules())
    p = alloc.problem
    for i, (name, curv) in enumerate(report.ops.items()):
        for j, c in enumerate(p.choices[i]):
            if curv.kind == "matmul":
                want = 0.0
            else:
                want = curv.trace / curv.numel * _per_channel_error(mods[name].weight, c.w_bits)
            assert p.sens[i][j] == pytest.approx(want, rel=1e-5, abs=1e-30), (name, c)
    assert alloc.meta["setting"] == SETTINGS["hawq_v3"] and "weight-only" in SETTINGS["hawq_v3"]
    assert alloc.meta["tie_level"] == "layer"
    ours = allocate(report, cands, "hawq_v3_act", {}, model=model,
                    calib_batches=[(torch.randn(8, 3, 32, 32), None)],
                    base=OpSetting(granularity="per_channel"))  # fmt: skip
    assert ours.meta["tie_level"] == "activation"
    lin = [i for i, c in enumerate(report.ops.values()) if c.kind != "matmul"]
    # ours adds a positive activation term to every quantized-activation candidate
    assert all((ours.problem.sens[i] > p.sens[i]).all() for i in lin)


def test_whole_layer_ties_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(3, 6))
        sens = [rng.random(4) * 10 ** rng.uniform(-2, 2) for _ in range(n)]
        costs = {"bops": [rng.integers(1, 50, 4).astype(float) for _ in range(n)]}
        ties = [[f"op{i}" for i in rng.choice(n, 2, replace=False)]]
        for level in ("layer", "activation"):
            p = Problem([f"op{i}" for i in range(n)], [list(CANDS)] * n, sens, costs, ties, level)
            lo = sum(float(c.min()) for c in costs["bops"])
            hi = sum(float(c.max()) for c in costs["bops"])
            b = {"bops": float(rng.uniform(lo, hi))}
            bf = brute_force(p, b)
            if bf is None:
                continue
            sol = solve(p, b)
            assert sol.objective == pytest.approx(bf.objective, rel=1e-9)
            a, c = (sol.chosen(p)[o] for o in ties[0])
            if level == "layer":
                assert a == c
            else:
                assert a.a_level == c.a_level
    # a layer tie is stricter: op0 wants w4a4, op1 wants w8a4; activation ties allow both
    s = [np.array([0.0, 9.0, 9.0, 9.0]), np.array([9.0, 9.0, 0.0, 9.0])]
    for level, want in (("activation", [0, 2]), ("layer", None)):
        p = Problem(["op0", "op1"], [list(CANDS)] * 2, s, {}, [["op0", "op1"]], level)
        idx = solve(p).index
        if want:
            assert idx == want
        else:
            assert CANDS[idx[0]] == CANDS[idx[1]]


def test_configs_name_the_setting():
    assert AllocConfig().method == "hawq_v3_act"
    text = open(REPO / "conf/alloc/default.yaml").read()
    assert "hawq_v3      HAWQ-V3 exactly" in text and "hawq_v3_act" in text
    for m in ("hawq_v3", "hawq_v3_act"):
        assert m in SETTINGS
    for exp in ("vit_cifar_hawq", "resnet20_cifar_mixed", "resnet20_cifar_hawq_a4"):
        assert "method: hawq_v3_act" in open(REPO / f"conf/experiment/{exp}.yaml").read()


def test_one_forward_pass_and_more_images_only_when_imprecise():
    model = tiny_vit()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    ops = quantizable_ops(model)
    from hawq.models.ops import op_kind

    op_cands = {n: (op_kind(m), [Candidate(4, 4), Candidate(8, 8)]) for n, m in ops.items()}
    batches = [(torch.randn(16, 3, 32, 32), None) for _ in range(4)]
    _, info = activation_errors(model, batches, op_cands, OpSetting(), images=8, rel_se=1.0)
    assert calls == [8] and info["images"] == 8  # all ops and candidates in one pass
    calls.clear()
    _, info = activation_errors(model, batches, op_cands, OpSetting(), images=8, rel_se=1e-9,
                                max_images=40)  # fmt: skip
    assert calls == [8, 16, 32, 40] and info["images"] == 40


def test_stage_caches_sensitivities_and_names_the_setting(make_cfg, run_dir):
    smoke = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64",
             "stages=[alloc]", "alloc.frontier_points=0", f"paths.checkpoint={run_dir}/model.pt")
    r1 = run_pipeline(make_cfg(*smoke, "alloc.int4_share=0.5", run_dir=run_dir))
    assert r1["stages"]["alloc"]["sensitivity_cache"] == "miss"
    r2 = run_pipeline(make_cfg(*smoke, "alloc.int4_share=0.6", run_dir=run_dir))
    st = r2["stages"]["alloc"]
    assert st["sensitivity_cache"] == "hit" and "calibration_s" not in st["timings"]
    _, meta = load_plan(run_dir / "bits.yaml")
    assert meta["setting"] == SETTINGS["hawq_v3_act"] and meta["method"] == "hawq_v3_act"
    r3 = run_pipeline(make_cfg(*smoke, "alloc.int4_share=0.6", "alloc.method=hawq_v3",
                               run_dir=run_dir))  # fmt: skip
    assert r3["stages"]["alloc"]["sensitivity_cache"] == "miss"
    _, meta = load_plan(run_dir / "bits.yaml")
    assert meta["method"] == "hawq_v3" and meta["tie_level"] == "layer"
    plan, _ = load_plan(run_dir / "bits.yaml")
    for b in (0, 1):  # whole-layer ties: the tied matmuls take one candidate
        qk, av = plan.setting(f"blocks.{b}.attn.qk"), plan.setting(f"blocks.{b}.attn.av")
        assert (qk.w_bits, qk.a_bits) == (av.w_bits, av.a_bits)
