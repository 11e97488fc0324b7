"""hawq.engine: CPU bf16 autocast rule, progress lines without a TTY, train-time estimate."""

import logging

import pytest
import torch

from hawq.engine import StepTimer, amp_enabled, autocast, cpu_bf16_supported, fmt_seconds
from hawq.pipeline import run_pipeline


def test_amp_off_is_fp32_everywhere():
    assert not amp_enabled(torch.device("cpu"), False)
    a = torch.randn(8, 8)
    with autocast(torch.device("cpu"), False):
        assert (a @ a).dtype == torch.float32


def test_amp_on_cpu_follows_native_bf16():
    a = torch.randn(8, 8)
    with autocast(torch.device("cpu"), True):
        out = a @ a
    assert amp_enabled(torch.device("cpu"), True) == cpu_bf16_supported()
    assert out.dtype == (torch.bfloat16 if cpu_bf16_supported() else torch.float32)


@pytest.mark.parametrize("s,text", [(7.25, "7.2s"), (95, "1m35s"), (3725, "1h02m"),
                                    (float("inf"), "?")])  # fmt: skip
def test_fmt_seconds(s, text):
    assert fmt_seconds(s) == text


def test_step_timer_logs_eta_and_estimates_once(caplog):
    estimates = []
    timer = StepTimer(total=20, desc="epoch 1/3", every_s=0.0, probe_steps=3,
                      on_estimate=estimates.append)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hawq"):
        for step in range(20):
            timer.tick(step, ", loss 1.000")
    assert len(estimates) == 1 and estimates[0] >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("ETA" in line and "elapsed" in line for line in lines)
    assert "epoch 1/3: step 1/20, loss 1.000" in lines[0]
    assert not any("step 20/20" in line for line in lines)  # the epoch line reports the end


def test_train_stage_announces_estimate_and_epoch_eta(make_cfg, caplog):
    cfg = make_cfg("experiment=smoke", "data.train_subset=512", "data.test_subset=64",
                   "data.batch_size=32", "train.epochs=2", "stages=[train]")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hawq"):
        run_pipeline(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert any("s/step -> estimated" in line and "for 2 epochs" in line for line in lines)
    epochs = [line for line in lines if line.startswith("epoch ") and "test loss" in line]
    assert len(epochs) == 2 and all("ETA" in line and "elapsed" in line for line in epochs)
    assert "epoch 2/2" in epochs[-1] and epochs[-1].endswith("ETA 0.0s")


def test_train_eval_every_skips_test_passes_but_not_the_last(make_cfg, tmp_path):
    cfg = make_cfg("experiment=smoke", "data.train_subset=128", "data.test_subset=64",
                   "data.batch_size=64", "train.epochs=3", "train.eval_every=2",
                   "stages=[train]")  # fmt: skip
    res = run_pipeline(cfg)["stages"]["train"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    tested = [row.split(",")[4] != "" for row in rows]
    assert tested == [False, True, True]
    assert res["test_acc"] is not None and res["best_test_acc"] >= res["test_acc"]
