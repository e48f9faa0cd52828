"""Checkpoints: atomic writes, weights_only loading, retention, and resuming a killed trial exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from masksweep import checkpoint, engine
from masksweep.errors import ConfigError
from masksweep.train import train


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    # A child process starts writing a large checkpoint and is SIGKILLed in the middle of it.
    script = (
        "import sys, torch; from masksweep.checkpoint import save_atomic; from pathlib import Path;"
        "save_atomic({'epoch': 2, 'w': torch.ones(200_000_000)}, Path(sys.argv[1]))"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.pt.tmp*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ConfigError, match="resume.*last.pt"):
        checkpoint.load(path)


def test_retention_policies(tmp_path: Path) -> None:
    for keep, expected in (("last", {"last.pt"}), ("best", {"best.pt"}), ("both", {"last.pt", "best.pt"})):
        with checkpoint.CheckpointManager(tmp_path / keep, keep) as manager:
            manager.save({"epoch": 1, "optimizer": {"state": {}}}, improved=True)
            manager.wait()
            assert checkpoint.load(manager.last)["optimizer"] == {"state": {}}  # resumable while running
            manager.save({"epoch": 2, "optimizer": {"state": {}}}, improved=False, final=True)
            manager.finish()
        assert {p.name for p in (tmp_path / keep).iterdir()} == expected
    # Finished: weights without optimizer state; best.pt is the best epoch's, last.pt the final one's.
    assert checkpoint.load(tmp_path / "both" / "best.pt") == {"epoch": 1}
    assert checkpoint.load(tmp_path / "both" / "last.pt") == {"epoch": 2}


def test_a_queued_checkpoint_holds_the_values_at_save_time(tmp_path: Path) -> None:
    weights = torch.zeros(1_000_000)
    with checkpoint.CheckpointManager(tmp_path, "last") as manager:
        manager.save({"model": {"w": weights}, "optimizer": {"state": {0: {"m": weights}}}}, improved=False)
        weights += 1  # training goes on while the write is queued or running
        manager.finish()
    state = checkpoint.load(tmp_path / "last.pt")
    assert not state["model"]["w"].any() and not state["optimizer"]["state"][0]["m"].any()


def test_a_failed_checkpoint_write_fails_the_trial(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError), checkpoint.CheckpointManager(blocker / "checkpoints", "both") as manager:
        manager.save({"epoch": 1}, improved=True)
        manager.finish()


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_gives_identical_metrics(make_cfg, workdir: Path, monkeypatch) -> None:
    overrides = ("tracking=none", "epochs=3", "data.hflip=0.5", "trainer.limit_train_batches=2")
    uninterrupted = train(make_cfg(*overrides, f"checkpoint.dir={workdir / 'full'}"))

    real_evaluate = engine.evaluate
    calls = []

    def evaluate_then_die(*args, **kwargs):
        if len(calls) == 1:  # the kill lands during epoch 2, after epoch 1's checkpoint
            raise Interrupted
        calls.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_die)
    with pytest.raises(Interrupted):
        train(make_cfg(*overrides, f"checkpoint.dir={workdir / 'killed'}"))
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    assert checkpoint.load(workdir / "killed" / "last.pt")["progress"]["epoch"] == 1

    resumed = train(
        make_cfg(
            *overrides, f"checkpoint.dir={workdir / 'resumed'}", f"resume={workdir / 'killed' / 'last.pt'}"
        )
    )
    assert {k: v for k, v in resumed.items() if k != "run_id"} == {
        k: v for k, v in uninterrupted.items() if k != "run_id"
    }


def test_checkpoint_of_another_model_names_the_mismatch(make_cfg, workdir: Path) -> None:
    train(make_cfg("tracking=none", f"checkpoint.dir={workdir / 'a'}"))
    with pytest.raises(ConfigError, match="model.max_size=96.*64, the value"):
        train(make_cfg("tracking=none", "model.max_size=96", f"resume={workdir / 'a' / 'last.pt'}"))


def test_a_finished_trial_keeps_weights_that_resume_only_its_end(make_cfg, workdir: Path) -> None:
    overrides = ("tracking=none", "checkpoint.keep=both")
    finished = train(make_cfg(*overrides, f"checkpoint.dir={workdir / 'a'}"))
    last = checkpoint.load(workdir / "a" / "last.pt")
    assert "optimizer" not in last and last["progress"]["epoch"] == 1  # weights only once finished
    # A kill after the last checkpoint but before the end: the resumed run redoes only the end.
    resume = f"resume={workdir / 'a' / 'last.pt'}"
    again = train(make_cfg(*overrides, f"checkpoint.dir={workdir / 'b'}", resume))
    assert {k: v for k, v in again.items() if k != "run_id"} == {
        k: v for k, v in finished.items() if k != "run_id"
    }
    with pytest.raises(ConfigError, match="resume=.*the last.pt of an unfinished trial"):
        train(make_cfg(*overrides, "epochs=2", resume))
