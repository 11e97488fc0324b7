"""The ``alloc`` stage end to end from a hessian.json for the tiny ViT, and the report reader."""

from __future__ import annotations

import json

import pytest
import torch

from hawq.alloc import parse_hessian, read_hessian
from hawq.errors import HawqError
from hawq.models import quantizable_ops
from hawq.pipeline import run_pipeline
from hawq.quant.plan import load_plan

from .cases import tiny_vit, write_report

SMOKE = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64", "stages=[alloc]",
         "alloc.calib_batches=2", "alloc.calib_batch_size=32", "alloc.frontier_points=6",
         "alloc.int4_share=null")  # fmt: skip  (budgets come from each test)


def _cfg(make_cfg, run_dir, *extra):
    return make_cfg(*SMOKE, f"paths.checkpoint={run_dir}/model.pt", *extra, run_dir=run_dir)


def test_stage_writes_a_plan_within_budget_that_quantize_accepts(make_cfg, run_dir):
    res = run_pipeline(_cfg(make_cfg, run_dir, "alloc.int4_share=0.6", "alloc.size_mb=0.05",
                            "alloc.pin_last={w_bits:8,a_bits:8}"))  # fmt: skip
    st = res["stages"]["alloc"]
    assert st["totals"]["int4_share"] >= 0.6 - 1e-6 and st["totals"]["size_mb"] <= 0.05 + 1e-9
    assert st["timings"]["alloc_s"] < 1.0  # from hessian.json, calibration passes excluded
    plan, meta = load_plan(run_dir / "bits.yaml")
    ops = list(quantizable_ops(tiny_vit()))
    settings = plan.resolved(ops)
    # bits.yaml round-trips: the same settings as the allocation's meta
    assert {n: f"w{s.w_bits}a{s.a_bits}" for n, s in settings.items()} == \
        {n: e["setting"] for n, e in meta["ops"].items()}
    assert settings["head"].w_bits == 8 and settings["head"].a_bits == 8  # pinned
    for b in (0, 1):  # tied: qk and av read views of the qkv output
        assert settings[f"blocks.{b}.attn.qk"].a_bits == settings[f"blocks.{b}.attn.av"].a_bits
    assert meta["budgets"] == {"size_mb": 0.05, "int4_share": 0.6}
    assert meta["method"] == "hawq_v3_act" and "optimal" in meta["solver"]["status"].lower()
    share = sum(o["macs"] for n, o in json.loads((run_dir / "hessian.json").read_text())["ops"]
                .items() if max(settings[n].w_bits, settings[n].a_bits) <= 4)  # fmt: skip
    total = sum(o["macs"] for o in json.loads((run_dir / "hessian.json").read_text())["ops"]
                .values())  # fmt: skip
    assert share / total == pytest.approx(meta["totals"]["int4_share"])
    assert (run_dir / "bits_per_op.png").stat().st_size > 0
    assert (run_dir / "bits_frontier.png").stat().st_size > 0
    pts = meta["frontier"]["points"]
    assert meta["frontier"]["budget"] == "size_mb" and len(pts) >= 1
    # the plan drives quantize_: every op becomes a quantized wrapper with the planned bits
    from hawq.quant.api import calibrate, quant_ops, quantize_

    model = tiny_vit()
    quantize_(model, plan)
    assert set(quant_ops(model)) == set(ops)
    calibrate(model, [(torch.randn(4, 3, 32, 32),)])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_rerun_skips_and_a_new_budget_reruns(make_cfg, run_dir):
    run_pipeline(_cfg(make_cfg, run_dir, "alloc.method=uniform", "alloc.bops=0.1"))
    mtime = (run_dir / "bits.yaml").stat().st_mtime_ns
    run_pipeline(_cfg(make_cfg, run_dir, "alloc.method=uniform", "alloc.bops=0.1"))
    assert (run_dir / "bits.yaml").stat().st_mtime_ns == mtime
    run_pipeline(_cfg(make_cfg, run_dir, "alloc.method=uniform", "alloc.bops=0.2"))
    _, meta = load_plan(run_dir / "bits.yaml")
    assert meta["budgets"] == {"bops": 0.2} and meta["totals"]["bops"] <= 0.2


def test_infeasible_budget_is_one_line_and_writes_nothing(make_cfg, run_dir):
    with pytest.raises(HawqError, match=r"alloc.avg_bits=2 is infeasible; the smallest feasible "
                                        r"value is 4\b"):  # fmt: skip
        run_pipeline(_cfg(make_cfg, run_dir, "alloc.method=random", "alloc.avg_bits=2"))
    assert not (run_dir / "bits.yaml").exists()
    assert not list(run_dir.glob("*.png"))


def test_bad_config_values(make_cfg, run_dir):
    with pytest.raises(HawqError, match="alloc.method='hawq_v9' is invalid"):
        run_pipeline(_cfg(make_cfg, run_dir, "alloc.method=hawq_v9"))
    with pytest.raises(HawqError, match="alloc.latency_us needs a latency table"):
        run_pipeline(_cfg(make_cfg, run_dir, "alloc.latency_us=3"))


def test_report_reader_names_file_and_missing_key(tmp_path):
    model = tiny_vit()
    report = write_report(model, tmp_path / "hessian.json")
    assert list(read_hessian(tmp_path / "hessian.json").ops) == list(quantizable_ops(model))
    del report["ops"]["head"]["act_trace"]["x"]
    with pytest.raises(HawqError, match=r"h\.json: op head: act_trace\.x is missing"):
        parse_hessian(report, where="h.json")
    del report["ops"]["head"]["kind"]
    with pytest.raises(HawqError, match=r"h\.json: op head: missing key 'kind'"):
        parse_hessian(report, where="h.json")
    with pytest.raises(HawqError, match="missing"):
        read_hessian(tmp_path / "nope.json")


def test_latency_budget_from_the_latency_stage(make_cfg, run_dir):
    """Stage ``latency`` times the checkpoint's ops; ``alloc.latency_us`` then reads
    latency.json (no ``alloc.latency_table`` given) and keeps the plan's total within it."""
    lat = ("latency.batch=2", "latency.iters=1", "latency.warmup=0", "alloc.method=uniform",
           "alloc.pin_last={w_bits:8,a_bits:8}")  # fmt: skip
    with pytest.raises(HawqError, match="alloc.latency_us needs a latency table: none at"):
        run_pipeline(_cfg(make_cfg, run_dir, *lat, "alloc.latency_us=1e9"))
    res = run_pipeline(_cfg(make_cfg, run_dir, *lat, "stages=[latency]"))
    table = json.loads((run_dir / "latency.json").read_text())
    assert set(table["ops"]) == set(quantizable_ops(tiny_vit()))
    assert res["stages"]["latency"]["shapes"] == len(table["by_shape"])
    assert (run_dir / "latency.png").stat().st_size > 0
    # halfway between the all-fastest and all-slowest plans
    rows = [table["by_shape"][s] for s in table["ops"].values()]
    lo, hi = sum(min(r.values()) for r in rows), sum(max(r.values()) for r in rows)
    budget = (lo + hi) / 2
    res = run_pipeline(_cfg(make_cfg, run_dir, *lat, f"alloc.latency_us={budget}"))
    _, meta = load_plan(run_dir / "bits.yaml")
    total = sum(table["by_shape"][table["ops"][n]][e["setting"]] for n, e in meta["ops"].items())
    assert meta["totals"]["latency_us"] == pytest.approx(total) and total <= budget + 1e-9
