"""The SLURM fixture (scripts/slurm-cluster) works as a user meets a cluster: jobs run with the submitter's
environment, cancel and requeue behave as on a real cluster, the declared slots run jobs side by side, and a
sweep through hydra/launcher=submitit_slurm completes. The sweeper's fault tests build on these facts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from masksweep.study import storage as B
from slurm_cluster import (
    SCRIPT,
    SlurmCluster,
    requeue,
    sacct_state,
    scancel,
    squeue_states,
    wait_ended,
    wait_for,
)

pytestmark = pytest.mark.slurm
APP = Path(__file__).resolve().parent / "sweeper_app" / "app.py"


def sbatch(cwd: Path, script: str, *options: str) -> str:
    """Submit a bash script from `cwd` (sbatch's default --export=ALL passes this environment); its job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", "-D", str(cwd), "-o", str(cwd / "slurm-%j.out"), *options],
        input=f"#!/bin/bash\n{script}\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split(";")[0]


def test_a_job_runs_the_projects_python_with_the_submitters_environment(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASKSWEEP_MARKER", "from-the-submitter")
    # The venv's python by its path (the node is this machine) and the marker from sbatch's --export=ALL.
    job = sbatch(tmp_path, f'{sys.executable} -c "import masksweep" && echo "$MASKSWEEP_MARKER" > out')
    assert wait_ended(job, 30) == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()
    assert (tmp_path / "out").read_text() == "from-the-submitter\n"


def test_a_cancelled_job_is_cancelled_in_accounting(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = sbatch(tmp_path, "sleep 120")
    wait_for(lambda: squeue_states([job]).get(job) == "RUNNING", 30, f"job {job} RUNNING")
    scancel(job)
    assert wait_ended(job, 30) == "CANCELLED"


def test_a_requeued_job_runs_again_and_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Each start appends SLURM_RESTART_COUNT; the first start waits to be requeued, the second one ends.
    starts = tmp_path / "starts"
    script = f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {starts}\n[ "$(wc -l < {starts})" -ge 2 ] || sleep 120'
    job = sbatch(tmp_path, script)
    wait_for(starts.exists, 30, f"job {job}'s first start")
    requeue(job)
    assert wait_ended(job, 60) == "COMPLETED"
    assert starts.read_text().split() == ["0", "1"]


def test_the_declared_slots_run_four_jobs_at_once(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    assert slurm_cluster.cpus >= 4  # the script declares 16 by default on any machine (config_overrides)
    jobs = [sbatch(tmp_path, "sleep 120", "-c", "1") for _ in range(4)]
    try:
        wait_for(lambda: set(squeue_states(jobs).values()) == {"RUNNING"}, 30, f"jobs {jobs} all RUNNING")
    finally:
        for job in jobs:
            scancel(job)


def test_start_again_is_a_no_op_and_bad_input_is_one_line(slurm_cluster: SlurmCluster) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)

    pid = (slurm_cluster.dir / "run" / "slurmctld.pid").read_text()
    again = script("start", str(slurm_cluster.dir), "--cpus", str(slurm_cluster.cpus))
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr
    bad = script("start", str(slurm_cluster.dir), "--cpus", "two")
    assert bad.returncode == 1
    assert bad.stderr == "slurm-cluster: --cpus two: not allowed, give a positive integer\n"
    assert (slurm_cluster.dir / "run" / "slurmctld.pid").read_text() == pid  # neither restarted it
    assert f"export SLURM_CONF={slurm_cluster.conf}\n" in script("env", str(slurm_cluster.dir)).stdout


def test_a_sweep_through_submitit_slurm_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(APP),
            "-m",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
            f"record_dir={tmp_path}",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=debug",
            f"hydra.launcher.submitit_folder={tmp_path / 'submitit' / '%j'}",
            "hydra.launcher.timeout_min=5",
            "hydra.launcher.mem_gb=1",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.tasks_per_node=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    storage = B.open_storage(B.parse_storage(None, "toy", cwd=tmp_path))
    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # Both ran as SLURM jobs: submitit keeps a folder per job id, and accounting has them COMPLETED.
    jobs = [p.name for p in (tmp_path / "submitit").iterdir() if p.is_dir()]
    assert len(jobs) == 2
    assert [sacct_state(job) for job in jobs] == ["COMPLETED"] * 2
