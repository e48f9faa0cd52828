"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py) through the faults a cluster has every
day: a cancelled job, a time limit shorter than the trial, a sweeper killed while its jobs run. Each fault
fails or resumes its own trial only; nothing is lost and nothing is trained twice. Real `masksweep-train -m`
sweeps of the tiny preset, as SLURM jobs (hydra/launcher=slurm, masksweep's submitit_slurm settings)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from masksweep.tracking import default_store
from slurm_cluster import SlurmCluster, sacct_state, scancel, wait_for
from test_sweep_e2e import runs_of, study_of, sweep_command

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
MASKSWEEP = str(Path(sys.executable).with_name("masksweep"))


def slurm_sweep(cache: Path, workdir: Path, study: str, *overrides: str) -> list[str]:
    return sweep_command(
        cache,
        workdir / "sweep",
        study,
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.slurm_poll_interval=1",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.pruner.name=none",
        "trainer.limit_train_batches=4",
        "data.num_train=8",
        *overrides,
    )


def env(cluster: SlurmCluster) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_CONF": str(cluster.conf)}


def run_sweep(command: list[str], cluster: SlurmCluster, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900, env=env(cluster))


def job_of(workdir: Path, study: str, number: int) -> str | None:
    """The SLURM job id the sweeper recorded for a trial (None until it is submitted)."""
    try:
        trials = study_of(workdir, study).trials
    except (KeyError, FileNotFoundError):
        return None
    record = trials[number].system_attrs.get("masksweep:job") if len(trials) > number else None
    return record["job_id"] if record else None


def reported(workdir: Path, study: str, number: int, epoch: int) -> bool:
    try:
        trials = study_of(workdir, study).trials
    except (KeyError, FileNotFoundError):
        return False
    return len(trials) > number and epoch in trials[number].intermediate_values


def two_trials_in_flight(
    cluster: SlurmCluster, cache: Path, workdir: Path, study: str
) -> tuple[list[str], subprocess.Popen]:
    """A 2-slot, 2-trial sweep, returned once trial 0 has finished its first epoch (and is mid-trial)."""
    command = slurm_sweep(
        cache,
        workdir,
        study,
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "lr=choice(0.001, 0.002)",
        "epochs=4",
    )
    # Its own session, so a test can kill -9 the sweeper alone; stderr kept for the exit's reason.
    sweeper = subprocess.Popen(
        command,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(cluster),
        start_new_session=True,
    )
    wait_for(lambda: reported(workdir, study, 0, 1) or sweeper.poll() is not None, 300, "trial 0's epoch 1")
    assert sweeper.poll() is None, "the sweep ended before its trial could be hit"
    return command, sweeper


def no_running_run(uri: str) -> None:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("masksweep")
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []


def test_a_cancelled_job_fails_and_retries_its_own_trial_only(
    slurm_cluster: SlurmCluster, workdir: Path, synthetic_cache: Path
) -> None:
    _, sweeper = two_trials_in_flight(slurm_cluster, synthetic_cache, workdir, "cancel")
    cancelled = job_of(workdir, "cancel", 0)
    scancel(cancelled)
    _, err = sweeper.communicate(timeout=600)
    assert sweeper.returncode == 0, err[-3000:]

    assert sacct_state(cancelled) == "CANCELLED"
    study = study_of(workdir, "cancel")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2  # one FAIL, retried
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert failed.number == 0 and "log:" in failed.user_attrs["error"]  # where to look
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == failed.params and retry.state == TrialState.COMPLETE
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]  # resumed: the dead attempt's epochs carried

    uri = default_store(workdir)[0]
    runs = runs_of(workdir, "cancel")
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags["optuna.trial_number"], []).append(run)
    assert [r.info.status for r in by_trial["1"]] == ["FINISHED"]  # the batch-mate ran once, and finished
    assert by_trial["1"][0].data.tags["slurm.restart_count"] == "0"
    assert [r.info.status for r in by_trial["0"]] == ["KILLED"]
    assert by_trial["0"][0].data.tags["stop.reason"] == "SIGTERM"
    assert by_trial["0"][0].data.tags["slurm.job_id"] == cancelled
    assert [r.info.status for r in by_trial[str(retry.number)]] == ["FINISHED"]
    assert by_trial[str(retry.number)][0].data.tags["masksweep.resumed_from"].endswith("last.pt")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("masksweep")
    parents = client.search_runs([experiment.experiment_id], "tags.`masksweep.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    no_running_run(uri)


def test_a_time_limit_requeues_the_job_and_the_trial_resumes(
    slurm_cluster: SlurmCluster, workdir: Path, synthetic_cache: Path
) -> None:
    # SLURM sends the --signal (SIGUSR2, which makes submitit requeue the job) at a periodic check up to 30 s
    # before it is due: with a 2-minute limit and signal_delay_s=60, between 30 and 60 s into the job. The
    # trial (about 20 x 3 s of epochs, plus start-up) outlasts that, so it is requeued at least once, and the
    # next attempt has the time to finish.
    epochs = 20
    trial = ("lr=choice(0.001)", f"epochs={epochs}", "trainer.limit_train_batches=6", "data.num_train=12")
    reference = subprocess.Popen(  # the same trial uninterrupted, meanwhile (one thread each)
        sweep_command(
            synthetic_cache, workdir / "reference", "reference", "hydra.sweeper.n_trials=1", *trial
        ),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(slurm_cluster),
    )
    command = slurm_sweep(
        synthetic_cache,
        workdir,
        "limit",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "hydra.sweeper.n_trials=1",
        *trial,
    )
    result = run_sweep(command, slurm_cluster, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:]

    (t,) = study_of(workdir, "limit").trials
    assert t.state == TrialState.COMPLETE
    assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
    (run,) = runs_of(workdir, "limit")  # one trial, one run, continued across the requeues
    assert run.info.status == "FINISHED"
    assert int(run.data.tags.get("masksweep.requeues", 0)) >= 1, "the trial finished before its time limit"
    client = MlflowClient(default_store(workdir)[0])
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/epoch_loss")]
    assert sorted(logged) == list(range(1, epochs + 1))  # epoch 1 (and every other) trained once
    (ref,) = study_of(workdir, "reference").trials
    assert t.value == ref.value  # to the last digit: the resumed trial is the uninterrupted one
    assert t.intermediate_values == ref.intermediate_values


def test_a_killed_sweeper_is_rerun_and_adopts_its_jobs(
    slurm_cluster: SlurmCluster, workdir: Path, synthetic_cache: Path
) -> None:
    command, sweeper = two_trials_in_flight(slurm_cluster, synthetic_cache, workdir, "orphans")
    assert job_of(workdir, "orphans", 1) is not None
    os.killpg(sweeper.pid, signal.SIGKILL)
    sweeper.wait()
    jobs = [job_of(workdir, "orphans", n) for n in (0, 1)]
    rerun = run_sweep(command, slurm_cluster, workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count(": adopted (its worker process") == 2, rerun.stdout[-3000:]

    study = study_of(workdir, "orphans")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [sacct_state(j) for j in jobs] == ["COMPLETED", "COMPLETED"]  # each ran once, to the end
    uri = default_store(workdir)[0]
    runs = runs_of(workdir, "orphans")
    finished = [r.data.params["lr"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == ["0.001", "0.002"]  # no params trained to FINISHED twice
    no_running_run(uri)
    shown = subprocess.run(
        [MASKSWEEP, "compare", "--tracking-uri", uri, "--jobs"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "2 runs: 2 finished" in shown.stdout and "SLURM job" in shown.stdout, shown.stdout


def test_an_unknown_partition_is_one_line_before_any_job(
    slurm_cluster: SlurmCluster, workdir: Path, synthetic_cache: Path
) -> None:
    command = slurm_sweep(
        synthetic_cache,
        workdir,
        "nopart",
        "hydra.launcher.partition=gpu",
        "hydra.sweeper.n_trials=1",
        "lr=choice(0.001)",
    )
    result = run_sweep(command, slurm_cluster, workdir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "masksweep-train: hydra.launcher.partition=gpu is not a partition of this cluster; "
        "allowed: debug, urgent"
    )
    assert not (workdir / "sweep" / ".submitit").exists()
