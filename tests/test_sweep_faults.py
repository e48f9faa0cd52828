"""A study stays whole through faults and scale-out: kill -9 then rerun, batches through real Hydra launchers
(joblib, submitit_local), and two workers started together against a real `mlflow server`. Real
`masksweep-train -m` sweeps of the tiny preset (CPU, fixed seeds)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from masksweep.tracking import default_store
from test_sweep_e2e import study_of, sweep_command

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two trials at once on a 2-core runner


def _sweep_runs(uri: str, study: str) -> tuple[list, list]:
    """(parent runs, trial runs) of the study in the `masksweep` experiment."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("masksweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study_name` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("masksweep.role") == "sweep"]
    return parents, [r for r in runs if "optuna.trial_number" in r.data.tags]


def _no_running_run(uri: str) -> None:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("masksweep")
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert [r.info.run_name for r in running] == []


# ------------------------------------------------------------------------------------- kill -9, then rerun
PRUNING = [
    "hydra.sweeper.sampler.name=grid",
    "hydra.sweeper.sampler.seed=0",
    "hydra.sweeper.pruner.name=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=0",
    "hydra.sweeper.n_trials=3",
    "lr=choice(0.0005, 0.005, 0.03)",
    "epochs=2",
    "optimized_metric=val/iou_global",  # AP of a 64 px toy is often 0 for all; IoU separates the trials
]


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_kill_9_mid_trial_then_rerun_keeps_one_study(tmp_path: Path, synthetic_cache: Path) -> None:
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean.mkdir(), faulty.mkdir()
    done = subprocess.run(
        sweep_command(synthetic_cache, clean / "sweep", "kill9", *PRUNING),
        cwd=clean,
        capture_output=True,
        text=True,
        timeout=900,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    command = sweep_command(synthetic_cache, faulty / "sweep", "kill9", *PRUNING)
    worker = subprocess.Popen(
        command,
        cwd=faulty,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=ENV,
    )
    checkpoint = faulty / "sweep" / "1" / "checkpoints" / "last.pt"  # trial 1 finished its first epoch
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, "trial 1 finished before it could be killed"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    rerun = subprocess.run(command, cwd=faulty, capture_output=True, text=True, timeout=900, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    uri = default_store(faulty)[0]
    parents, trials = _sweep_runs(uri, "kill9")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    _no_running_run(uri)

    study = study_of(faulty, "kill9")
    assert len(_finished(study)) == 3 and [t.state for t in study.trials].count(TrialState.FAIL) == 1
    for t in _finished(study):  # the retry carries the epoch its dead attempt did before the kill
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and (t.state == TrialState.PRUNED or steps == [1, 2])
    pruned = {t.params["lr"] for t in _finished(study) if t.state == TrialState.PRUNED}
    assert pruned == {
        t.params["lr"] for t in _finished(study_of(clean, "kill9")) if t.state == TrialState.PRUNED
    }

    results = yaml.safe_load((faulty / "sweep" / "optimization_results.yaml").read_text())
    assert results["counts"]["finished"] == 3 and results["counts"]["retried"] == 1
    metrics = MlflowClient(uri).get_run(parents[0].info.run_id).data.metrics
    assert metrics["counts.retried"] == 1 and metrics["counts.finished"] == 3


# ------------------------------------------------------------------------------------- Hydra launchers
LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_batch_of_two_runs_at_once_through_a_launcher(
    launcher: str, workdir: Path, synthetic_cache: Path
) -> None:
    command = sweep_command(
        synthetic_cache,
        workdir / "sweep",
        "batch",
        *LAUNCHERS[launcher],
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.n_trials=2",
        "lr=0.001,50",  # lr=50 diverges
        "trainer.grad_clip_norm=null",
        "trainer.limit_train_batches=8",
        "data.num_train=16",
        "divergence.sync_every=2",
    )
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    a, b = study_of(workdir, "batch").trials
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete  # overlapped
    by_lr = {t.params["lr"]: t for t in (a, b)}
    assert by_lr[0.001].state == TrialState.COMPLETE
    assert by_lr[50].state == TrialState.PRUNED and by_lr[50].user_attrs["diverged"] is True  # from the job

    uri = default_store(workdir)[0]
    parents, trials = _sweep_runs(uri, "batch")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in trials) == ["FINISHED", "KILLED"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}


# ------------------------------------------------------------------------------------- mlflow server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1: CI's PostgreSQL as its backend store (a database of its own),
    artifacts in a local directory."""
    import sqlalchemy

    from masksweep.study.storage import parse_storage

    url = os.environ.get("MASKSWEEP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MASKSWEEP_TEST_POSTGRES_URL is not set")
    admin = sqlalchemy.create_engine(parse_storage(url, "unused").url, isolation_level="AUTOCOMMIT")
    db = f"mlflow_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
    backend = sqlalchemy.engine.make_url(parse_storage(url, "unused").url).set(database=db)
    port = _free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend.render_as_string(hide_password=False),
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        admin.dispose()
        with sqlalchemy.create_engine(
            parse_storage(url, "unused").url, isolation_level="AUTOCOMMIT"
        ).connect() as c:
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {db}"))


@pytest.mark.postgres
def test_two_workers_started_together_on_a_tracking_server_share_one_parent(
    mlflow_server: str, workdir: Path, synthetic_cache: Path
) -> None:
    workers = [
        subprocess.Popen(
            sweep_command(
                synthetic_cache,
                workdir / f"sweep-{i}",
                "server",
                f"tracking.uri={mlflow_server}",
                "hydra.sweeper.sampler.name=grid",
                "hydra.sweeper.n_trials=2",
                "lr=0.001,0.002",
            ),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-3000:]
    parents, trials = _sweep_runs(mlflow_server, "server")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {
        parents[0].info.run_id
    }
    _no_running_run(mlflow_server)
