"""``hawq.report budget`` fractions over the ops the ILP decides (issue 15 item 7):
pinned ops add a constant, so B(0) is the cheapest plan the pins allow (feasible,
exactly), B(1) the dearest, and B(f) splits the decided ops' range as HAWQ-V3 does."""

from __future__ import annotations

import itertools

import pytest

from hawq.alloc import InfeasibleBudget, allocate, read_hessian
from hawq.report import budget_at, budget_range, main

from .cases import tiny_vit, write_report

CANDS = [{"w_bits": w, "a_bits": a} for w in (2, 4, 8) for a in (4, 8)]
PINS = [dict(pin_first={"w_bits": 8, "a_bits": 8}, pin_last={"w_bits": 8, "a_bits": 8}),
        dict(pin_first={"w_bits": 8, "a_bits": 8}),
        dict(pins={"blocks.0.attn.qk": {"w_bits": 8, "a_bits": 8},
                   "blocks.1.mlp.fc1": {"w_bits": 4, "a_bits": 4}}, pin_last={"w_bits": 4,
                                                                              "a_bits": 8})]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "hessian.json"
    model = tiny_vit()
    write_report(model, path)
    return model, path


def _alloc(setup, kind: str, limit: float, pins: dict):
    model, path = setup
    return allocate(read_hessian(path), CANDS, "uniform", {kind: limit}, model=model,
                    ties=False, **pins)  # fmt: skip


@pytest.mark.parametrize("kind", ["bops", "size_mb"])
@pytest.mark.parametrize("pins", PINS)
def test_fraction_runs_over_decided_ops(setup, kind, pins):
    model, path = setup
    lo, hi = budget_range(path, CANDS, kind, **pins)
    # oracle: the extremes over the decided ops, by the allocator's own cost rows
    free = _alloc(setup, kind, hi * 10, pins).problem
    rows = free.costs[kind]
    assert lo == pytest.approx(sum(float(r.min()) for r in rows), rel=1e-12)
    assert hi == pytest.approx(sum(float(r.max()) for r in rows), rel=1e-12)
    pinned = [i for i, c in enumerate(free.choices) if len(c) == 1]
    assert pinned  # the pins are single-candidate ops, counted at their pin
    a0 = _alloc(setup, kind, budget_at(lo, hi, 0.0), pins)  # B(0) is feasible
    assert a0.solution.totals[kind] <= budget_at(lo, hi, 0.0)
    _alloc(setup, kind, budget_at(lo, hi, 1.0), pins)
    with pytest.raises(InfeasibleBudget):
        _alloc(setup, kind, lo * (1 - 1e-6), pins)
    for f in (0.25, 0.5):  # a fraction of the decided range, not of the whole model's
        b = budget_at(lo, hi, f)
        assert (b - lo) / (hi - lo) == pytest.approx(f)


def test_unpinned_range_differs_and_cli_takes_pins(setup, capsys):
    _, path = setup
    lo_all, hi_all = budget_range(path, CANDS, "bops")
    lo, hi = budget_range(path, CANDS, "bops", **PINS[0])
    assert lo > lo_all and hi <= hi_all
    bits = ["--bits", "2", "4", "8"]
    assert main(["budget", str(path), "--kind", "bops", "--fraction", "0", *bits,
                 "--pin-first", "8", "--pin-last", "8"]) == 0  # fmt: skip
    printed = float(capsys.readouterr().out)
    cands = [{"w_bits": w, "a_bits": a} for w, a in itertools.product((2, 4, 8), repeat=2)]
    assert printed == budget_range(path, cands, "bops", **PINS[0])[0]
    assert main(["budget", str(path), "--fraction", "0.5", "--pin", "head=x"]) == 2
    assert "hawq: error:" in capsys.readouterr().err
