"""The sweeper end to end with the toy app (tests/sweeper_app): real Hydra multiruns in subprocesses.

Each run happens in its own directory under tmp_path, so the default journal storage (./mlruns/optuna/) and
the sweep directory are the test's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.masksweep_optuna._space import quote
from masksweep.study import storage as B

APP = Path(__file__).resolve().parent / "sweeper_app" / "app.py"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _command(workdir: Path, *overrides: str, sweep_dir: str = "multirun") -> list[str]:
    return [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.sweep.dir={workdir / sweep_dir}",
        f"record_dir={workdir}",
        *overrides,
    ]


def _run(
    workdir: Path,
    *overrides: str,
    check: bool = True,
    sweep_dir: str = "multirun",
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        _command(workdir, *overrides, sweep_dir=sweep_dir),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _study(workdir: Path, name: str = "toy", storage: str | None = None) -> optuna.Study:
    spec = B.parse_storage(storage, name, cwd=workdir)
    return optuna.load_study(study_name=name, storage=B.open_storage(spec))


def _by_state(trials: list[FrozenTrial]) -> Counter[str]:
    return Counter(t.state.name for t in trials)


def _runs(workdir: Path) -> list[int]:
    return [int(line.split()[0]) for line in (workdir / "runs.txt").read_text().splitlines()]


def test_diverged_crashed_and_bad_returns_get_their_states(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "mode=choice(ok, diverge, crash, return_nan, return_none, return_text)",
        "opt=b",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.n_trials=10",  # capped to the 6 grid points
        "hydra.sweeper.max_failure_rate=1.0",
    )
    trials = {t.params["mode"]: t for t in _study(tmp_path).trials}
    assert len(trials) == 6
    assert trials["ok"].state == TrialState.COMPLETE and trials["ok"].value == pytest.approx(0.46)
    div = trials["diverge"]
    assert div.state == TrialState.PRUNED
    assert div.user_attrs == {
        "diverged": True,
        "divergence_reason": "loss is nan",
        "divergence_step": 1,
        "divergence_detected_at": 1,
        "divergence_value": "nan",
    }
    assert trials["crash"].state == TrialState.FAIL
    assert trials["crash"].user_attrs["error"] == "RuntimeError: simulated crash in the data loader"
    assert "not a finite number" in trials["return_nan"].user_attrs["error"]
    assert "returned None" in trials["return_none"].user_attrs["error"]
    assert "must return a float" in trials["return_text"].user_attrs["error"]
    assert all(trials[m].state == TrialState.FAIL for m in ("return_nan", "return_none", "return_text"))
    assert "simulated crash in the data loader" in proc.stdout + proc.stderr  # the traceback is logged

    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["counts"] == {
        "complete": 1,
        "pruned": 0,
        "diverged": 1,
        "failed": 4,
        "running": 0,
        "waiting": 0,
        "retried": 0,
        "interrupted": 0,
        "surplus": 0,
        "finished": 6,
    }
    assert results["best"]["number"] == trials["ok"].number and results["best"]["params"] == {"mode": "ok"}
    assert results["study_name"] == "toy" and results["status"] == "finished"
    # The journal's path: what optuna-dashboard takes, and Optuna's API through JournalFileBackend.
    assert results["storage"] == f"{tmp_path}/mlruns/optuna/toy.journal"
    backend = optuna.storages.journal.JournalFileBackend(results["storage"])
    reopened = optuna.load_study(study_name="toy", storage=optuna.storages.JournalStorage(backend))
    assert len(reopened.trials) == 6
    assert (tmp_path / "multirun" / "optimization_history.png").stat().st_size > 0
    assert (
        results["plots"]["param_importances"] is None
        and "complete trials" in results["plots"]["param_importances_skipped"]
    )


def test_too_many_failures_stop_the_sweep_with_a_clear_error(tmp_path: Path) -> None:
    proc = _run(
        tmp_path, "mode=crash", "hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.25", check=False
    )
    assert proc.returncode != 0
    assert (
        "sweep stopped: 2 of the study's n_trials=4 trials failed, more than max_failure_rate=0.25"
        in proc.stderr
    )
    assert _by_state(_study(tmp_path).trials) == {"FAIL": 2}  # both told before stopping
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["status"] == "aborted" and results["counts"]["failed"] == 2


def test_the_median_pruner_prunes_a_clearly_worse_trial(tmp_path: Path) -> None:
    common = ["opt=b", "epochs=4", "hydra.sweeper.pruner.n_startup_trials=2"]
    _run(tmp_path, "x=0.3", "hydra.sweeper.n_trials=2", *common)
    _run(tmp_path, "x=5.0", "hydra.sweeper.n_trials=3", *common)  # the same study, one more trial
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["pruned_reason"] == "pruner median at epoch 0"
    assert trials[2].user_attrs["pruned_step"] == 0 and list(trials[2].intermediate_values) == [0]


def _backend_overrides(backend: str, tmp_path: Path) -> tuple[list[str], str, str | None]:
    """Overrides selecting a storage backend, with the study name and storage URL to load it back."""
    if backend == "journal":
        return [], "toy", None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/optuna.db"
        return [f"hydra.sweeper.storage={quote(url)}"], "toy", url
    url = os.environ.get("MASKSWEEP_TEST_POSTGRES_URL")
    if not url:
        print("skipped: set MASKSWEEP_TEST_POSTGRES_URL=postgresql://user:pass@host/db to run it")
        pytest.skip("MASKSWEEP_TEST_POSTGRES_URL is not set")
    name = f"toy-{uuid.uuid4().hex[:8]}"
    return [f"hydra.sweeper.storage={quote(url)}", f"hydra.sweeper.study_name={name}"], name, url


def _drop_study(name: str, url: str | None) -> None:
    if url is not None and url.startswith("postgresql"):
        storage = B.open_storage(B.parse_storage(url, name))
        if name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.parametrize(
    "backend", ["journal", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_killed_sweep_resumes_and_retries_the_killed_trial(tmp_path: Path, backend: str) -> None:
    extra, name, url = _backend_overrides(backend, tmp_path)
    try:
        _kill_and_resume(tmp_path, extra, name, url)
    finally:
        _drop_study(name, url)


def _kill_and_resume(tmp_path: Path, extra: list[str], name: str, url: str | None) -> None:
    overrides = ["x=tag(log, interval(0.01, 1))", "opt=a,b", "hang_trial=1", *extra]
    command = _command(tmp_path, *overrides)
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "hang-1"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert first.poll() is None and time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    before = _study(tmp_path, name, url).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]

    _run(tmp_path, *overrides)  # the same command again
    trials = _study(tmp_path, name, url).trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == before[0].value  # intact, not re-run
    assert trials[1].state == TrialState.FAIL and trials[1].system_attrs[B.STALE_ATTR].startswith("stale:")
    # Found at once when the dead worker's pid is visible, else after the grace period: either way one retry.
    (retry,) = [t for t in trials if t.system_attrs.get(B.RETRY_FROM_ATTR) == 1]
    assert retry.params == trials[1].params
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(trials) == 5
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4  # exactly n_trials
    assert sorted(_runs(tmp_path)) == [0, 1, 2, 3, 4]  # trial 0 ran once
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["counts"]["retried"] == 1 and results["counts"]["failed"] == 0
    assert results["counts"]["finished"] == 4


def _two_workers(tmp_path: Path, *overrides: str) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen(
            _command(tmp_path, *overrides, sweep_dir=f"multirun-{i}"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        assert p.returncode == 0, f"worker failed:\n{out}\n{err}"
    return done


def _check_parallel_study(tmp_path: Path, study: optuna.Study, n_trials: int) -> None:
    trials = study.trials
    assert len(trials) == n_trials
    assert all(t.state.is_finished() for t in trials)
    runs = _runs(tmp_path)
    assert sorted(runs) == list(range(n_trials))  # every trial ran exactly once
    assert len({t.params["x"] for t in trials}) == n_trials  # grid: no point twice
    assert len({int(line.split()[1]) for line in (tmp_path / "runs.txt").read_text().splitlines()}) == 2
    # One summary per study, from all of its trials, written once by the worker that saw the study end.
    candidates = [tmp_path / f"multirun-{i}" / "optimization_results.yaml" for i in range(2)]
    summaries = [p for p in candidates if p.exists()]
    assert len(summaries) == 1
    results = yaml.safe_load(summaries[0].read_text())
    assert results["counts"]["finished"] == n_trials and results["status"] == "finished"
    assert len(results["trials"]) == n_trials


def test_two_workers_share_the_default_journal_storage(tmp_path: Path) -> None:
    procs = _two_workers(
        tmp_path,
        "x=choice(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)",
        "sleep=0.5",  # long enough that the second worker, however slow to start, gets trials too
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.n_trials=6",
    )
    _check_parallel_study(tmp_path, _study(tmp_path), 6)
    assert not any("database is locked" in p.stderr for p in procs)


@pytest.mark.postgres
def test_two_workers_share_a_postgres_storage(tmp_path: Path) -> None:
    extra, name, url = _backend_overrides("postgres", tmp_path)
    try:
        _two_workers(
            tmp_path,
            "x=choice(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)",
            "sleep=0.5",  # long enough that the second worker, however slow to start, gets trials too
            "hydra.sweeper.sampler.name=grid",
            "hydra.sweeper.n_trials=6",
            *extra,
        )
        _check_parallel_study(tmp_path, _study(tmp_path, name, url), 6)
    finally:
        _drop_study(name, url)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_trial_ends_fail_and_is_retried(tmp_path: Path, sig: signal.Signals) -> None:
    overrides = ["x=choice(0.1, 0.2)", "hydra.sweeper.sampler.name=grid", "hang_trial=0"]
    proc = subprocess.Popen(
        _command(tmp_path, *overrides),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "hang-0").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "trial 0 never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig and "Traceback" not in err  # the shell's status for the signal
    assert lines[-1].startswith("masksweep-train: ") and "interrupted" in lines[-1]
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # queued again, same params
    assert trials[1].params == trials[0].params and trials[1].system_attrs[B.RETRY_FROM_ATTR] == 0

    _run(tmp_path, *[o for o in overrides if not o.startswith("hang_trial")])
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
