"""The ``int4_curve`` stage as issue 12's study needs it (tiny ViT, synthetic data, seconds).

Oracles: the measured order is the argsort of single-op PTQ drops computed independently
on the held-out train images (``data.val_size``), never on the test split; the random
band is the numpy mean/std of independently recomputed permutation curves; the INT2
picks and all-INT2 accuracies equal independent PTQ runs; the hessian stage's time is
read from the ``results.json`` beside ``hessian.json``.
"""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
from hydra.utils import instantiate

from hawq.alloc.curve import band, order_entry, prefixes, random_order
from hawq.engine import evaluate
from hawq.errors import HawqError
from hawq.models import op_inventory
from hawq.pipeline import run_pipeline
from hawq.quant.api import calibrate, quantize_
from hawq.quant.plan import OpSetting, Plan, load_plan

from .cases import tiny_vit

SMOKE = ("experiment=smoke", "data.train_subset=96", "data.test_subset=64",
         "stages=[int4_curve]", "curve.calib_batches=2", "curve.calib_batch_size=32",
         "curve.rest=fp", "curve.batch_size=32")  # fmt: skip
N_OPS = 14


def _cfg(make_cfg, run_dir, *extra):
    return make_cfg(*SMOKE, f"paths.checkpoint={run_dir}/model.pt", *extra, run_dir=run_dir)


def _acc(cfg, bits: dict[str, tuple[int, int]], split: str = "test",
         default: tuple[int | None, int | None] = (None, None)) -> float:  # fmt: skip
    """Independent PTQ: these ops at these bits, the rest at ``default``; calibrated on the
    first 2 train batches of 32; evaluated on ``split`` in batches of 32."""
    data = instantiate(cfg.data)
    base = OpSetting(**cfg.quant.default).as_dict()
    plan = Plan(OpSetting(**{**base, "w_bits": default[0], "a_bits": default[1]}),
                {n: OpSetting(**{**base, "w_bits": w, "a_bits": a})
                 for n, (w, a) in bits.items()})  # fmt: skip
    model = quantize_(tiny_vit(), plan)
    calibrate(model, list(islice(data.eval_loader("train", "cpu", 32), 2)))
    return evaluate(model, data.eval_loader(split, "cpu", 32), "cpu")["acc"]


def test_measured_order_is_chosen_on_held_out_train_images(make_cfg, run_dir):
    cfg = _cfg(make_cfg, run_dir, "data.val_size=32", "curve.order_split=val",
               "curve.orders=[hessian,measured]",
               "curve.step=7")  # fmt: skip
    res = run_pipeline(cfg)["stages"]["int4_curve"]
    out = json.loads((run_dir / "int4_curve.json").read_text())
    ops = out["ops"]
    ref_val = _acc(cfg, {}, "val")
    drops = out["sensitivity"]["measured"]
    for n in ops[::5]:  # single-op drops are val-split accuracies
        assert drops[n] == pytest.approx(ref_val - _acc(cfg, {n: (4, 4)}, "val"), abs=1e-9)
    assert out["orders"]["measured"]["sequence"] == \
        [ops[i] for i in np.argsort([drops[n] for n in ops], kind="stable")]
    # the curve itself is scored on the test split
    seq = out["orders"]["measured"]["sequence"]
    assert out["orders"]["measured"]["accuracies"][1] == _acc(cfg, {n: (4, 4) for n in seq[:7]})
    rank = out["ranking"]
    assert rank["measured"]["evaluations"] == N_OPS + 1 and rank["measured"]["split"] == "val"
    assert rank["measured"]["images"] == 32
    assert rank["hessian"]["evaluations"] == 0 and rank["hessian"]["seconds"] >= 0
    assert res["ranking"]["measured"]["evaluations"] == N_OPS + 1


def test_held_out_images_are_the_train_tail_and_never_trained_on(make_cfg, tmp_path):
    full = instantiate(make_cfg("data=synthetic", "data.train_subset=null").data).splits.train
    data = instantiate(make_cfg("data=synthetic", "data.train_subset=null",
                                "data.val_size=100").data)  # fmt: skip
    s = data.splits
    assert len(s.val) == 100 and len(s.train) == len(full) - 100
    assert bool((s.val.images == full.images[-100:]).all())
    assert bool((s.train.images == full.images[:-100]).all())
    seen = sum(int(y.shape[0]) for _, y in data.train_loader())
    assert seen <= len(full) - 100
    with pytest.raises(HawqError, match="val_size"):
        instantiate(make_cfg("data=synthetic").data).eval_loader("val")


def test_order_split_val_without_val_size_is_one_line(make_cfg, run_dir):
    with pytest.raises(HawqError, match="data.val_size") as e:
        run_pipeline(_cfg(make_cfg, run_dir, "curve.orders=[measured]", "curve.order_split=val"))
    assert "\n" not in str(e.value)


def test_random_band_int2_picks_all_int2_and_hessian_time(make_cfg, run_dir):
    (run_dir / "results.json").write_text(json.dumps({"stages": {"hessian": {"wall_s": 12.5}}}))
    cfg = _cfg(make_cfg, run_dir, "curve.order_split=train", "curve.random_orders=3",
               "curve.step=14", "curve.random_step=7", "curve.int2_plan_k=3",
               "curve.int2_orders=[hessian,measured]",
               "curve.all_int2=true")  # fmt: skip
    res = run_pipeline(cfg)["stages"]["int4_curve"]
    out = json.loads((run_dir / "int4_curve.json").read_text())
    ops = out["ops"]
    macs = {o.name: o.macs for o in op_inventory(tiny_vit())}
    points = prefixes(N_OPS, 7)
    # three permutations from seeds 0, 1, 2, each curve recomputed independently
    runs = []
    for seed in range(3):
        seq = random_order(ops, seed)
        accs = [_acc(cfg, {n: (4, 4) for n in seq[:p]}) for p in points]
        runs.append(order_entry(seq, points, accs, macs, out["fp_acc"], [2, 5, 10]))
    rb = out["random_band"]
    assert rb["n"] == 3 and rb["seeds"] == [0, 1, 2]
    assert [r["sequence"] for r in rb["runs"]] == [r["sequence"] for r in runs]
    accs = np.array([r["accuracies"] for r in runs])
    np.testing.assert_allclose(rb["acc_mean"], accs.mean(0), atol=1e-9)
    np.testing.assert_allclose(rb["acc_std"], accs.std(0, ddof=1), atol=1e-9)
    for t in ("2", "5", "10"):
        vals = [r["max_op_share_within"][t] for r in runs]
        ok = [v for v in vals if v is not None]
        assert rb["max_op_share_within"][t]["values"] == vals
        if ok:
            assert rb["max_op_share_within"][t]["mean"] == pytest.approx(np.mean(ok))
    assert band(runs, [2, 5, 10])["acc_mean"] == pytest.approx(rb["acc_mean"])
    # INT2 on the 3 least sensitive ops of each pick, rest FP; all-INT2
    for i, pick in enumerate(["hessian", "measured"]):
        rec = out["int2_by_order"][pick]
        assert rec["ops"] == out["orders"][pick]["sequence"][:3]
        assert rec["acc"] == _acc(cfg, {n: (2, 2) for n in rec["ops"]})
        name = "int2_k3_bits.yaml" if i == 0 else f"int2_k3_{pick}_bits.yaml"
        plan, meta = load_plan(run_dir / name)
        assert sorted(plan.ops) == sorted(rec["ops"]) and meta["order"] == pick
    assert out["int2"]["order"] == "hessian"
    assert out["all_int2_acc"] == _acc(cfg, {}, default=(2, 2)) == res["all_int2_acc"]
    # cost to rank: 0 evaluations for the Hessian order, its stage time read back
    assert out["ranking"]["hessian"]["hessian_stage_s"] == 12.5
    assert rb["prefixes"] == [0, 7, 14] and out["orders"]["hessian"]["prefixes"] == [0, 14]
    assert (run_dir / "int4_curve.png").stat().st_size > 0
