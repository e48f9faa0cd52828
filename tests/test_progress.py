"""Progress without a terminal: log lines with step, loss, it/s and ETA within an epoch."""

from __future__ import annotations

import io
import logging

import pytest

from masksweep.progress import ProgressLog
from masksweep.train import train


def test_lines_every_n_steps_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    progress = ProgressLog(6, "epoch 1", every_s=1e9, every_n=2, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="masksweep.progress"):
        for step in progress.wrap(range(6)):
            if step == 2:
                progress.set_postfix(loss="0.8123")
    lines = [r.getMessage() for r in caplog.records if r.name == "masksweep.progress"]
    assert [line.split("  ")[0] for line in lines] == [
        f"epoch 1: step {n}/6 ({100 * n / 6:.0f}%)" for n in (2, 4, 6)
    ]
    assert "loss" not in lines[0] and "loss 0.8123" in lines[1]
    assert all(" it/s" in line for line in lines) and "ETA" in lines[0]


def test_disabled_progress_prints_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="masksweep.progress"):
        assert list(
            ProgressLog(3, "eval", enabled=False, every_n=1, stream=io.StringIO()).wrap("abc")
        ) == list("abc")
    assert not [r for r in caplog.records if r.name == "masksweep.progress"]


def test_a_non_tty_trial_logs_progress_within_the_epoch(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(
        "tracking=none",
        "data.num_train=8",
        "trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=2",
        "trainer.progress=true",
        "trainer.progress_every_n_steps=1",
    )
    with caplog.at_level(logging.INFO, logger="masksweep.progress"):
        train(cfg)  # pytest captures stderr: not a terminal
    lines = [r.getMessage() for r in caplog.records if r.name == "masksweep.progress"]
    steps = [line for line in lines if line.startswith("epoch 1: step")]
    assert [line.split("  ")[0].split(" (")[0] for line in steps] == [
        f"epoch 1: step {n}/4" for n in (1, 2, 3, 4)
    ]
    assert "loss" not in steps[0] and "loss " in steps[1]  # the loss read at the logging step, no extra sync
    evaluated = [line.split(" (")[0] for line in lines if line.startswith("eval:")]
    assert evaluated == ["eval: batch 1/1"]  # evaluation reports on the same clock
