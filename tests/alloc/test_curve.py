"""The ``int4_curve`` stage on the tiny ViT (14 ops) with a synthetic hessian.json."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
from hydra.utils import instantiate
from scipy.stats import spearmanr

from hawq.alloc.curve import int2_plan, max_share_within, prefixes
from hawq.engine import evaluate
from hawq.errors import HawqError
from hawq.models import op_inventory
from hawq.pipeline import run_pipeline
from hawq.quant.api import calibrate, quantize_
from hawq.quant.plan import OpSetting, Plan, load_plan

from .cases import tiny_vit

SMOKE = ("experiment=smoke", "data.train_subset=96", "data.test_subset=64",
         "stages=[int4_curve]", "curve.calib_batches=2", "curve.calib_batch_size=32",
         "curve.step=1", "curve.order_split=test", "curve.random_orders=1")  # fmt: skip
N_OPS = 14


def _cfg(make_cfg, run_dir, *extra):
    return make_cfg(*SMOKE, f"paths.checkpoint={run_dir}/model.pt", *extra, run_dir=run_dir)


def _ptq_acc(cfg, bits: dict[str, tuple[int | None, int | None]], rest=(8, 8)) -> float:
    """Independent oracle: quantize the checkpoint's model with this plan, calibrate on the
    first 2 train batches of 32, evaluate the test split (what the stage should do)."""
    data = instantiate(cfg.data)
    base = OpSetting(**cfg.quant.default)
    plan = Plan(OpSetting(**{**base.as_dict(), "w_bits": rest[0], "a_bits": rest[1]}),
                {n: OpSetting(**{**base.as_dict(), "w_bits": w, "a_bits": a})
                 for n, (w, a) in bits.items()})  # fmt: skip
    model = quantize_(tiny_vit(), plan)
    calibrate(model, list(islice(data.eval_loader("train", "cpu", 32), 2)))
    return evaluate(model, data.eval_loader("test", "cpu"), "cpu")["acc"]


def test_curves_json_png_oracles_and_int2_plan(make_cfg, run_dir):
    cfg = _cfg(make_cfg, run_dir, "curve.int2_plan_k=6")
    res = run_pipeline(cfg)["stages"]["int4_curve"]
    out = json.loads((run_dir / "int4_curve.json").read_text())
    assert (run_dir / "int4_curve.png").stat().st_size > 0
    ops = [o.name for o in op_inventory(tiny_vit())]
    macs = {o.name: o.macs for o in op_inventory(tiny_vit())}
    assert out["ops"] == ops and len(ops) == N_OPS
    assert set(out["orders"]) == {"hessian", "measured", "random"}
    # endpoints: the same two plans in every order, and equal to an independent PTQ run
    high = _ptq_acc(cfg, {})
    int4 = _ptq_acc(cfg, {n: (4, 4) for n in ops})
    assert out["high_acc"] == high and out["int4_acc"] == int4
    for name, e in out["orders"].items():
        assert sorted(e["sequence"]) == sorted(ops), name
        assert e["prefixes"] == list(range(N_OPS + 1))
        assert e["accuracies"][0] == high and e["accuracies"][-1] == int4, name
        assert e["shares"][0] == 0.0 and e["shares"][-1] == pytest.approx(1.0)
        assert all(a <= b for a, b in zip(e["shares"], e["shares"][1:])), name
        cum = np.cumsum([0] + [macs[n] for n in e["sequence"]]) / sum(macs.values())
        np.testing.assert_allclose(e["shares"], cum, rtol=1e-12)
        assert e["op_shares"] == [p / N_OPS for p in range(N_OPS + 1)]
        assert e["fp_acc"] == out["fp_acc"] == res["fp_acc"]
        for t in ("2", "5", "10"):
            want = max_share_within(e["shares"], e["accuracies"], out["fp_acc"], float(t))
            assert e["max_share_within"][t] == want == res["max_share_within"][name][t]
    # orders: argsorts of the recorded sensitivities; the random one from its seed
    drops = out["sensitivity"]["measured"]
    hess = out["sensitivity"]["hessian"]
    assert out["orders"]["measured"]["sequence"] == \
        [ops[i] for i in np.argsort([drops[n] for n in ops], kind="stable")]
    assert out["orders"]["hessian"]["sequence"] == \
        [ops[i] for i in np.argsort([hess[n] for n in ops], kind="stable")]
    assert out["orders"]["random"]["sequence"] == \
        [ops[i] for i in np.random.default_rng(0).permutation(N_OPS)]
    # a single-op drop is the independent single-op PTQ accuracy below the all-W8A8 one
    least = out["orders"]["measured"]["sequence"][0]
    assert drops[least] == pytest.approx(high - _ptq_acc(cfg, {least: (4, 4)}), abs=1e-9)
    assert out["orders"]["measured"]["accuracies"][1] == _ptq_acc(cfg, {least: (4, 4)})
    rho = spearmanr([hess[n] for n in ops], [drops[n] for n in ops])
    assert out["spearman"]["rho"] == pytest.approx(float(rho.statistic), abs=1e-12)
    assert res["spearman"] == out["spearman"]
    # INT2 plan: exactly the 6 least sensitive (measured) ops at W2A2, every other op FP
    plan, meta = load_plan(run_dir / "int2_k6_bits.yaml")
    settings = plan.resolved(ops)
    w2a2 = [n for n, s in settings.items() if (s.w_bits, s.a_bits) == (2, 2)]
    assert len(w2a2) == 6 and all(s.is_float for n, s in settings.items() if n not in w2a2)
    assert max(drops[n] for n in w2a2) <= min(drops[n] for n in ops if n not in w2a2)
    assert set(w2a2) == set(out["orders"]["measured"]["sequence"][:6]) == set(meta["ops"])
    assert out["int2"]["acc"] == _ptq_acc(cfg, {n: (2, 2) for n in w2a2}, rest=(None, None))
    assert res["evaluations"] == out["evaluations"] >= N_OPS + 2


def test_step_rest_fp_and_no_hessian_needed(make_cfg, run_dir):
    (run_dir / "hessian.json").unlink()  # the measured and random orders do not read it
    cfg = _cfg(make_cfg, run_dir, "curve.step=4", "curve.rest=fp",
               "curve.orders=[measured,random]", "curve.thresholds=[1,3]")  # fmt: skip
    res = run_pipeline(cfg)["stages"]["int4_curve"]
    out = json.loads((run_dir / "int4_curve.json").read_text())
    assert set(out["orders"]) == {"measured", "random"} and out["spearman"] is None
    assert out["rest"] == "fp" and out["high_acc"] == out["fp_acc"]  # rest FP = the FP model
    for e in out["orders"].values():
        assert e["prefixes"] == [0, 4, 8, 12, 14] == prefixes(N_OPS, 4)
        assert len(e["shares"]) == len(e["accuracies"]) == 5
        assert set(e["max_share_within"]) == {"1", "3"}
    assert out["int4_acc"] == _ptq_acc(cfg, {n: (4, 4) for n in out["ops"]}, rest=(None, None))
    assert set(res["max_share_within"]) == {"measured", "random"}


def test_rerun_skips_and_a_changed_config_reruns(make_cfg, run_dir):
    extra = ("curve.orders=[random]", "curve.step=7")
    run_pipeline(_cfg(make_cfg, run_dir, *extra))
    path = run_dir / "int4_curve.json"
    mtime = path.stat().st_mtime_ns
    first = json.loads(path.read_text())["orders"]["random"]["sequence"]
    run_pipeline(_cfg(make_cfg, run_dir, *extra))
    assert path.stat().st_mtime_ns == mtime
    run_pipeline(_cfg(make_cfg, run_dir, *extra, "force=true"))
    assert path.stat().st_mtime_ns != mtime
    mtime = path.stat().st_mtime_ns
    run_pipeline(_cfg(make_cfg, run_dir, *extra, "curve.seed=1"))
    assert path.stat().st_mtime_ns != mtime
    assert json.loads(path.read_text())["orders"]["random"]["sequence"] != first
    mtime = path.stat().st_mtime_ns
    run_pipeline(_cfg(make_cfg, run_dir, *extra, "curve.seed=1", "quant.default.dynamic=true"))
    assert path.stat().st_mtime_ns != mtime  # quant.default is part of the key


@pytest.mark.parametrize(("override", "match"), [
    ("curve.step=0", r"bad config: curve\.step=0 is invalid; allowed: an integer >= 1"),
    ("curve.rest=w4a4", r"curve\.rest='w4a4' is invalid"),
    ("curve.rest=int8", r"curve\.rest='int8' is invalid"),
    ("curve.orders=[hessian,sorted]", r"curve\.orders=.* is invalid"),
    ("curve.method=measured", r"curve\.method='measured' is invalid"),
    ("curve.int2_plan_k=3 curve.orders=[random]", r"curve\.int2_order='measured' is invalid"),
    ("curve.int2_plan_k=15 curve.orders=[random] curve.int2_order=random",
     r"curve\.int2_plan_k=15 is invalid; allowed: 1\.\.14"),
    ("+curve.bogus=1", r"bad config curve\.bogus"),
])  # fmt: skip
def test_bad_config_values_give_one_line(make_cfg, run_dir, override, match):
    with pytest.raises(HawqError, match=match) as e:
        run_pipeline(_cfg(make_cfg, run_dir, *override.split()))
    assert "\n" not in str(e.value)
    assert not (run_dir / "int4_curve.json").exists()


def test_int2_plan_helper():
    base = OpSetting(granularity="per_tensor")
    plan = int2_plan(["c", "a", "b"], 2, base)
    assert plan.default.is_float and plan.default.granularity == "per_tensor"
    assert {n: (s.w_bits, s.a_bits) for n, s in plan.ops.items()} == {"c": (2, 2), "a": (2, 2)}
    with pytest.raises(HawqError, match="int2_plan_k=0"):
        int2_plan(["a"], 0, base)
