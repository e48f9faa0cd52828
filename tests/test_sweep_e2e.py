"""Real `masksweep-train -m` Optuna sweeps of the tiny preset: divergence, pruning and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from conftest import TINY_OVERRIDES, signal_once_logged
from masksweep.tracking import default_store

pytestmark = pytest.mark.slow
TRAIN = str(Path(sys.executable).with_name("masksweep-train"))


def sweep_command(cache: Path, sweep_dir: Path, study: str, *overrides: str) -> list[str]:
    return [
        TRAIN,
        "-m",
        "hydra/sweeper=masksweep_optuna",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY_OVERRIDES,
        f"data.cache_dir={cache}",
        *overrides,
    ]


def study_of(workdir: Path, name: str) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(
        str(workdir / "mlruns" / "optuna" / f"{name}.journal")
    )
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def runs_of(workdir: Path, study: str) -> list:
    client = MlflowClient(default_store(workdir)[0])
    experiment = client.get_experiment_by_name("masksweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study_name` = '{study}'")
    return [run for run in runs if "optuna.trial_number" in run.data.tags]  # not the sweep's parent run


def test_a_diverging_trial_is_pruned_within_a_few_steps(workdir: Path, synthetic_cache: Path) -> None:
    command = sweep_command(
        synthetic_cache,
        workdir / "sweep",
        "diverge",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.n_trials=2",
        "lr=0.001,50",
        "trainer.grad_clip_norm=null",
        "trainer.limit_train_batches=12",
        "data.num_train=24",
        "divergence.sync_every=4",
    )
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    trials = {t.params["lr"]: t for t in study_of(workdir, "diverge").trials}
    assert trials[0.001].state == optuna.trial.TrialState.COMPLETE
    diverged = trials[50]
    assert diverged.state == optuna.trial.TrialState.PRUNED and diverged.user_attrs["diverged"] is True
    attrs = diverged.user_attrs
    assert attrs["divergence_reason"] and attrs["divergence_detected_at"] - attrs["divergence_step"] <= 5

    runs = {run.data.tags["optuna.trial_number"]: run for run in runs_of(workdir, "diverge")}
    killed = runs[str(diverged.number)]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["stop.kind"] == "diverged"
    assert killed.data.tags["stop.reason"] == attrs["divergence_reason"]
    assert int(killed.data.tags["stop.step"]) == attrs["divergence_step"]
    assert runs[str(trials[0.001].number)].info.status == "FINISHED"


def test_a_killed_trial_is_retried_from_its_last_checkpoint(workdir: Path, synthetic_cache: Path) -> None:
    def command(sweep_dir: str) -> list[str]:
        return sweep_command(
            synthetic_cache,
            workdir / sweep_dir,
            "killed",
            "hydra.sweeper.sampler.name=grid",
            "hydra.sweeper.n_trials=1",
            "lr=0.01,0.02",
            "epochs=4",
        )

    worker = subprocess.Popen(
        command("first"),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = workdir / "first" / "0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, "the trial finished before it could be killed"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()

    result = subprocess.run(command("second"), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    states = sorted(t.state.name for t in study_of(workdir, "killed").trials)
    assert states == ["COMPLETE", "FAIL"]  # the killed attempt and its retry; the budget of 1 is met

    runs = sorted(runs_of(workdir, "killed"), key=lambda run: run.info.start_time)
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
    assert "retried" in runs[0].data.tags["error"]
    assert runs[1].data.tags["masksweep.resumed_from"] == str(checkpoint)
    history = MlflowClient(default_store(workdir)[0]).get_metric_history(runs[1].info.run_id, "val/ap_segm")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # the resumed run carries the whole curve


def test_sigterm_to_a_sweep_kills_the_trials_run_and_the_study_retries_it(
    workdir: Path, synthetic_cache: Path
) -> None:
    def command(sweep_dir: str) -> list[str]:
        return sweep_command(
            synthetic_cache,
            workdir / sweep_dir,
            "signalled",
            "hydra.sweeper.sampler.name=grid",
            "hydra.sweeper.n_trials=1",
            "lr=0.01",
            "epochs=3",
            "trainer.progress=true",
            "trainer.progress_every_n_steps=1",
        )

    # In epoch 2: epoch 1's checkpoint is on disk.
    status, stderr = signal_once_logged(command("first"), workdir, "epoch 2: step 1/", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    (killed,) = runs_of(workdir, "signalled")
    assert killed.info.status == "KILLED"  # not RUNNING for ever
    states = [t.state.name for t in study_of(workdir, "signalled").trials]
    assert states == ["FAIL", "WAITING"]  # queued again with the same params

    result = subprocess.run(command("second"), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t.state.name for t in study_of(workdir, "signalled").trials] == ["FAIL", "COMPLETE"]
    runs = sorted(runs_of(workdir, "signalled"), key=lambda run: run.info.start_time)
    assert [run.info.status for run in runs] == ["KILLED", "FINISHED"]
    assert runs[1].data.tags["masksweep.resumed_from"].endswith("last.pt")  # from epoch 1's checkpoint
