"""SIGTERM and SIGINT end a single trial KILLED, with one line, no traceback and a valid checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import signal_once_logged
from masksweep.interrupts import Interrupted, signals_raise


def test_sigterm_and_sigint_raise_interrupted_inside_the_block_only() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(Interrupted) as info, signals_raise():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        assert info.value.signum == signum and info.value.exit_status == 128 + signum
        assert isinstance(info.value, KeyboardInterrupt)  # what the tracker already records as KILLED
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handler is back


@pytest.mark.slow
def test_sigterm_ends_a_running_trial_killed(workdir: Path, synthetic_cache: Path) -> None:
    from mlflow import MlflowClient

    from masksweep import checkpoint

    exe = Path(sys.executable).with_name("masksweep-train")
    args = [
        "trainer=smoke",
        "data.image_size=64",
        "data.num_train=8",
        "data.num_val=2",
        f"data.cache_dir={synthetic_cache}",
        "++model.pretrain.enabled=false",
        "epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.progress=true",
        "trainer.progress_every_n_steps=1",
        f"checkpoint.dir={workdir / 'ck'}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # In epoch 2: epoch 1's checkpoint is on disk.
    status, stderr = signal_once_logged([str(exe), *args], workdir, "epoch 2: step 1/3", signal.SIGTERM, env)
    assert status == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("masksweep-train: stopped by SIGTERM"), stderr
    # Absolute: MLflow caches a store per URI string, so a relative one would reach an earlier test's file.
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksweep").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ap_segm")] == [1]
    saved = checkpoint.load(workdir / "ck" / checkpoint.LAST)
    assert saved["progress"]["epoch"] == 1 and "optimizer" in saved  # resumable
