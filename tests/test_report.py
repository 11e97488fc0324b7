"""Results tables from run directories and the budget-fraction parametrisation."""

from __future__ import annotations

import statistics

import pytest

from hawq.alloc.report import synthetic_report
from hawq.errors import HawqError
from hawq.io import write_json, write_yaml
from hawq.models import ViT
from hawq.models.ops import op_inventory
from hawq.report import Row, budget_at, budget_range, load_rows, lookup, main, results_table

PROV = {"git": "0123456789abcdef+dirty", "hardware": "NVIDIA H100 80GB HBM3 x1"}


def _run(root, name, acc, share=None):
    res = {"name": name, "provenance": PROV, "stages": {"evaluate": {"fp": {"acc": acc}}}}
    if share is not None:
        res["stages"]["alloc"] = {"totals": {"int4_share": share}}
    write_json(root / name / "results.json", res)


def test_table_mean_std_and_to_run(tmp_path):
    accs = [91.0, 92.5, 90.25]
    for seed, acc in enumerate(accs):
        _run(tmp_path, f"fp_seed{seed}", acc, share=0.5 + 0.1 * seed)
    (tmp_path / "fp_seed9").mkdir()  # unfinished run: no results.json, ignored
    rows = [
        Row("FP", "fp_seed*", "stages.evaluate.fp.acc", "python -m hawq.run seed=0,1,2 -m"),
        Row("INT4 share", ["fp_seed0", "fp_seed0"], "stages.alloc.totals.int4_share", scale=100,
            digits=1),  # a directory matched twice counts once
        Row("QAT", "qat_seed*", "stages.qat.quantized.acc", "python -m hawq.run stages=[qat]"),
    ]
    table = results_table(rows, tmp_path).splitlines()
    assert table[0].startswith("| row | value | runs | command | commit | hardware |")
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert table[2] == (f"| FP | {mean:.2f} ± {std:.2f} | 3 | `python -m hawq.run seed=0,1,2 -m` "
                        "| 0123456+dirty | NVIDIA H100 80GB HBM3 x1 |")  # fmt: skip
    assert table[3].startswith("| INT4 share | 50.0 | 1 | - |")
    assert table[4].startswith("| QAT | to run | 0 |")


def test_rows_yaml_and_cli(tmp_path, capsys):
    _run(tmp_path, "a", 80.0)
    rows = tmp_path / "rows.yaml"
    write_yaml(rows, [{"label": "FP", "runs": "a", "metric": "stages.evaluate.fp.acc"}])
    assert [r.label for r in load_rows(rows)] == ["FP"]
    assert main(["table", str(rows), "--runs", str(tmp_path)]) == 0
    assert "| FP | 80.00 | 1 |" in capsys.readouterr().out
    write_yaml(rows, [{"label": "FP", "bogus": 1}])
    with pytest.raises(HawqError, match="row 0"):
        load_rows(rows)


def test_lookup():
    obj = {"a": {"b": [1, {"c": 2}]}}
    assert lookup(obj, "a.b.1.c") == 2 and lookup(obj, "a.b.0") == 1
    assert lookup(obj, "a.x") is None and lookup(obj, "a.b.5") is None


def test_budget_range_is_all_low_to_all_high(tmp_path):
    model = ViT(image_size=32, patch_size=4, in_chans=3, num_classes=10, dim=32, depth=1,
                heads=2, mlp_dim=64, dropout=0.0)  # fmt: skip
    path = tmp_path / "hessian.json"
    write_json(path, synthetic_report(model, (3, 32, 32), 0))
    inv = op_inventory(model, (3, 32, 32))
    cands = [{"w_bits": w, "a_bits": a} for w in (4, 8) for a in (4, 8)]
    lo, hi = budget_range(path, cands, "bops")
    assert lo == pytest.approx(sum(o.macs for o in inv) * 16 / 1e9)
    assert hi == pytest.approx(sum(o.macs for o in inv) * 64 / 1e9)
    lo, hi = budget_range(path, cands, "size_mb")
    params = sum(o.params for o in inv if o.kind != "matmul")
    assert (lo, hi) == pytest.approx((params * 4 / 8 / 2**20, params * 8 / 8 / 2**20))
    assert budget_at(lo, hi, 0.25) == pytest.approx(lo + 0.25 * (hi - lo))
    with pytest.raises(HawqError, match="fraction"):
        budget_at(lo, hi, 1.5)
    with pytest.raises(HawqError, match="budget kind"):
        budget_range(path, cands, "latency_us")


def test_tradeoff_points_recompute_costs_from_the_applied_plans(make_cfg, tmp_path):
    from hawq.pipeline import run_pipeline
    from hawq.report import main, tradeoff_points

    base = ("experiment=smoke", "data.train_subset=128", "data.test_subset=64", "train.epochs=1")
    run_pipeline(make_cfg(*base, "stages=[train]", run_dir=tmp_path / "fp"))
    ckpt = f"paths.checkpoint={tmp_path}/fp/model.pt"
    accs = {}
    for bits in (4, 8):
        res = run_pipeline(make_cfg(*base, ckpt, "stages=[ptq]", f"quant.default.w_bits={bits}",
                                    f"quant.default.a_bits={bits}",
                                    run_dir=tmp_path / f"w{bits}"))  # fmt: skip
        accs[bits] = res["stages"]["ptq"]["quantized"]["acc"]
    pts, fp = tradeoff_points([str(tmp_path / "w*")], "ptq", "bops")
    (b4, a4), (b8, a8) = pts
    assert (a4, a8) == (accs[4], accs[8]) and fp is not None
    assert b8 == pytest.approx(4 * b4)  # every op W4A4 -> W8A8: BOPs x 4
    shares, _ = tradeoff_points([str(tmp_path / "w*")], "ptq", "int4_share")
    assert [s for s, _ in shares] == [1.0, 0.0]
    out = tmp_path / "t.png"
    assert main(["tradeoff", f"uniform={tmp_path}/w*", "--out", str(out)]) == 0 and out.is_file()
    assert main(["tradeoff", f"{tmp_path}/none*", "--out", str(out)]) == 2
