"""masksweep.study: the layering rule, the study registry (parent run, workers), carried epoch values and
retries of interrupted trials. Fast, in-process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from hydra_plugins.masksweep_optuna._outcomes import classify
from hydra_plugins.masksweep_optuna._results import trial_label
from hydra_plugins.masksweep_optuna._samplers import default_study_name
from hydra_plugins.masksweep_optuna._space import parse_search_space
from masksweep.study import carry_intermediate_values, dead_attempts
from masksweep.study import storage as S
from masksweep.study.heartbeat import WorkerIdentity, retry_trial
from masksweep.study.registry import StudyRegistry

optuna.logging.set_verbosity(optuna.logging.WARNING)
SRC = Path(__file__).resolve().parents[1] / "src" / "masksweep"


def test_masksweep_never_imports_hydra_plugins() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
                names = [n for n in names if isinstance(n, str)]
            bad = [n for n in names if n.split(".")[0] == "hydra_plugins"]
            offenders += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in bad]
    assert offenders == []


def test_a_trial_imports_no_hydra_plugins_module() -> None:
    code = (
        "import sys, masksweep.study, masksweep.train, masksweep.tracking\n"
        "print(sorted(m for m in sys.modules if m.startswith('hydra_plugins')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def journal(tmp_path: Path) -> tuple[S.StorageSpec, optuna.storages.BaseStorage]:
    spec = S.parse_storage(None, "s", cwd=tmp_path)
    return spec, S.open_storage(spec)


def test_a_record_is_claimed_once_and_replaced_only_when_unusable(journal, tmp_path: Path) -> None:
    spec, storage = journal
    optuna.create_study(study_name="s", storage=storage)
    made: list[int] = []

    def make() -> dict:
        made.append(1)
        return {"run_id": f"r{len(made)}"}

    registries = [StudyRegistry(storage, "s", S.study_lock(spec, "s")) for _ in range(2)]
    first = registries[0].claim("k", make)
    second = registries[1].claim("k", make)
    assert first == ({"run_id": "r1"}, True) and second == ({"run_id": "r1"}, False) and len(made) == 1
    replaced = registries[1].claim("k", make, replace=lambda rec: rec["run_id"] == "r1")
    assert replaced == ({"run_id": "r2"}, True)


def test_workers_are_live_until_they_leave_or_stop_beating(journal) -> None:
    spec, storage = journal
    optuna.create_study(study_name="s", storage=storage)
    registry = StudyRegistry(storage, "s", S.study_lock(spec, "s"))
    me, other = WorkerIdentity.current(), WorkerIdentity("elsewhere", 1, "b", "ns", "other")
    registry.join(me)
    registry.join(other)
    assert [w["id"] for w in registry.live_workers(me, grace_period=60)] == ["other"]
    assert registry.live_workers(me, grace_period=60, now=10**12) == []  # its beat is too old
    registry.leave(other)
    assert registry.live_workers(me, grace_period=60) == []
    dead = WorkerIdentity(me.host, 2**22 + 12345, me.boot, me.pidns, "dead")  # this machine, no such pid
    registry.join(dead)
    assert registry.live_workers(me, grace_period=60) == []


def test_a_retry_gets_its_dead_attempts_values_for_the_epochs_it_resumes_past(journal) -> None:
    _, storage = journal
    study = optuna.create_study(study_name="s", storage=storage)
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(0.1, 1.0)})
    dead.report(0.5, 1)
    dead.report(0.6, 2)
    storage.set_trial_state_values(dead._trial_id, TrialState.FAIL)
    assert retry_trial(study, storage.get_trial(dead._trial_id), max_retry=3)
    retry = study.ask()
    assert retry.params == dead.params
    assert [t.number for t in dead_attempts(storage, study._study_id, retry._trial_id)] == [dead.number]
    # It resumed from the checkpoint of epoch 1 and reports epoch 2 again: only epoch 1 is carried.
    assert carry_intermediate_values(storage, study._study_id, retry._trial_id, before=2) == 1
    retry.report(0.61, 2)
    assert carry_intermediate_values(storage, study._study_id, retry._trial_id) == 0  # nothing left to carry
    assert storage.get_trial(retry._trial_id).intermediate_values == {1: 0.5, 2: 0.61}


def test_an_interrupted_job_is_failed_for_a_retry() -> None:
    class TrialInterrupted(Exception):
        pass

    for exc in (KeyboardInterrupt(), TrialInterrupted("SIGTERM")):
        ret = JobReturn(overrides=[], status=JobStatus.FAILED)
        ret._return_value = exc
        outcome = classify(ret)
        assert outcome.state == TrialState.FAIL and outcome.retry
    ret = JobReturn(overrides=[], status=JobStatus.FAILED)
    ret._return_value = RuntimeError("boom")
    assert not classify(ret).retry


def test_retried_trials_are_counted_by_why_they_failed(journal) -> None:
    """The end-of-sweep line tells a dead worker's trial (stale) from one stopped by a signal or lost job."""
    from hydra_plugins.masksweep_optuna._outcomes import lost_job, with_log
    from hydra_plugins.masksweep_optuna._results import count_trials, retry_cause
    from masksweep.study.heartbeat import fail_and_retry

    _, storage = journal
    study = optuna.create_study(study_name="s", storage=storage)
    dist = {"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}
    ret = JobReturn(overrides=[], status=JobStatus.FAILED)
    ret._return_value = KeyboardInterrupt("SIGTERM")
    reasons = [
        "stale: no heartbeat from host:1 for 200s",
        classify(ret).message,
        with_log(
            lost_job(RuntimeError("Job 7 has not produced any output (state: CANCELLED)")), "/logs/7.err"
        ).message,
    ]
    for reason in reasons:
        trial = study.ask(dist)
        assert fail_and_retry(study, storage, storage.get_trial(trial._trial_id), reason, max_retry=3)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert [retry_cause(t) for t in failed] == ["stale", "interrupted", "job lost"]
    counts = count_trials(study.get_trials())
    assert (counts.retried, counts.interrupted, counts.waiting) == (3, 2, 1)  # each ask popped the retry
    assert failed[2].user_attrs["error"].endswith("(log: /logs/7.err)")


def test_names_read_as_the_report_and_the_sweep() -> None:
    assert trial_label(3, "trial4") == "trial4 (#3)" and trial_label(3) == "#3"
    space = parse_search_space({"lr": "tag(log, interval(1e-4, 1e-2))"}, [])
    name = default_study_name("lr_wd", space, "maximize")
    assert name.startswith("lr_wd-") and len(name) == len("lr_wd-") + 6
    assert name == default_study_name("lr_wd", space, "maximize")
    assert name != default_study_name("lr_wd", space, "minimize")


def test_the_printed_storage_opens_the_study(journal) -> None:
    spec, storage = journal
    optuna.create_study(study_name="s", storage=storage)
    hint = spec.dashboard_hint("s")
    assert hint.startswith(f"optuna-dashboard {spec.path} |")
    study = eval(hint.split(" | ", 1)[1], {"optuna": optuna})  # the Python form, as printed
    assert study.study_name == "s"
    if os.environ.get("MASKSWEEP_TEST_POSTGRES_URL"):
        pg = S.parse_storage(os.environ["MASKSWEEP_TEST_POSTGRES_URL"], "s")
        assert pg.dashboard_hint("s").startswith(f"optuna-dashboard {pg.describe()} |")


def test_a_retry_is_pruned_where_its_dead_attempt_would_have_been(journal) -> None:
    from masksweep.errors import TrialPruned
    from masksweep.study import TrialReporter

    spec, storage = journal
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    pruner = {"name": "median", "kwargs": {"n_startup_trials": 1, "n_warmup_steps": 0}}
    storage.set_study_system_attr(study._study_id, S.PRUNER_ATTR, pruner)
    dist = {"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}
    good = study.ask(dist)
    good.report(1.0, 1)
    good.report(1.0, 2)
    study.tell(good, 1.0)
    dead = study.ask(dist)
    dead.report(0.1, 1)  # killed before it acted on the pruner's answer for epoch 1
    storage.set_trial_state_values(dead._trial_id, TrialState.FAIL)
    retry_trial(study, storage.get_trial(dead._trial_id), max_retry=3)
    retry = study.ask()
    cfg = {"storage": spec.url, "study_name": "s", "trial_number": retry.number}
    reporter = TrialReporter.from_config(cfg)
    with pytest.raises(TrialPruned) as stop:
        reporter.report(0.9, step=2)  # it resumed from the epoch-1 checkpoint
    assert stop.value.step == 1
    assert storage.get_trial(retry._trial_id).intermediate_values == {1: 0.1}


def _open_parent(workdir: str, index: int, barrier, queue) -> None:
    from omegaconf import OmegaConf

    from masksweep.tracking.parent import StudyParent

    os.chdir(workdir)
    spec = S.parse_storage(None, "shared", cwd=Path(workdir))
    storage = S.open_storage(spec)
    registry = StudyRegistry(storage, "shared", S.study_lock(spec, "shared"))
    config = OmegaConf.create(
        {
            "tracking": {"enabled": True, "uri": None, "experiment_name": "masksweep"},
            "optimized_metric": "val/ap_segm",
            "hydra": {"overrides": {"task": []}},
        }
    )
    barrier.wait(timeout=120)
    sweep = Path(workdir) / f"worker{index}"
    parent = StudyParent.open(config, registry, "shared", spec.describe(), sweep, others_live=False)
    queue.put(parent.run_id)


@pytest.mark.slow
def test_workers_started_together_on_one_study_share_one_parent(tmp_path: Path) -> None:
    import multiprocessing

    from mlflow import MlflowClient

    from masksweep.tracking import PARENT_RUN_FILE, default_store, open_client

    os.chdir(tmp_path)
    open_client(None)  # the store exists before the race, as for a second `make run`
    spec = S.parse_storage(None, "shared", cwd=tmp_path)
    optuna.create_study(study_name="shared", storage=S.open_storage(spec))
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_open_parent, args=(str(tmp_path), k, barrier, queue)) for k in range(3)]
    for proc in workers:
        proc.start()
    parents = {queue.get(timeout=300) for _ in workers}
    for proc in workers:
        proc.join(timeout=60)
    client = MlflowClient(default_store(tmp_path)[0])
    runs = client.search_runs([client.get_experiment_by_name("masksweep").experiment_id])
    assert len(parents) == 1 and [r.info.run_id for r in runs] == list(parents)
    tags = runs[0].data.tags
    assert tags["optuna.study_name"] == "shared" and tags["masksweep.role"] == "sweep"
    assert {(tmp_path / f"worker{k}" / PARENT_RUN_FILE).read_text() for k in range(3)} == parents


def test_adopted_trials_take_slots_before_new_ones_are_asked(journal) -> None:
    """A rerun that adopts a dead sweeper's running jobs counts them in its n_jobs slots: it asks no new
    trial while they fill the slots (the sweeper passes `room` as its free slots)."""
    from hydra_plugins.masksweep_optuna._budget import Budget
    from hydra_plugins.masksweep_optuna._settings import Settings
    from masksweep.study.heartbeat import HeartbeatThread, WorkerIdentity

    spec, storage = journal
    study = optuna.create_study(study_name="s", storage=storage)
    dist = {"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}
    orphan = study.ask(dist)
    dead = {**WorkerIdentity.current().as_attr(), "pid": 2**22 + 1}  # this machine, a pid that is not there
    storage.set_trial_system_attr(orphan._trial_id, S.WORKER_ATTR, dead)
    space = parse_search_space({"lr": "interval(0.1, 1.0)"}, [])
    me = WorkerIdentity.current()
    heartbeat = HeartbeatThread(storage, spec.kind, 60)  # not started: track() beats once
    budget = Budget(study, S.study_lock(spec, "s"), spec.kind, Settings(), 5, space, None, me, heartbeat)
    adopted: list[int] = []

    def adopt(trial: optuna.trial.FrozenTrial, why: str) -> bool:
        assert "is gone" in why
        adopted.append(trial.number)
        return True

    assert budget.claim(adopt=adopt, room=lambda: 1 - len(adopted)) is None  # the adopted job fills the slot
    assert adopted == [orphan.number] and study.trials[0].state == TrialState.RUNNING  # not failed
    assert len(study.trials) == 1
    assert budget.claim(room=lambda: 1) is not None  # a free slot: a new trial
