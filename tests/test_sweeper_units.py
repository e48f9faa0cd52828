"""Unit tests of the masksweep Optuna sweeper: discovery, search-space parsing, overrides, storages, samplers,
outcome classification and stale-trial reaping. Fast, in-process."""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.masksweep_optuna._outcomes import classify
from hydra_plugins.masksweep_optuna._samplers import build_sampler
from hydra_plugins.masksweep_optuna._settings import Settings, SweepError
from hydra_plugins.masksweep_optuna._space import (
    SearchSpaceError,
    format_value,
    grid_space,
    parse_search_space,
    quote,
)
from masksweep.errors import TrialDiverged, TrialPruned
from masksweep.study import storage as B
from masksweep.study.heartbeat import WorkerIdentity, reap_stale_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_plugin_is_discovered_as_a_sweeper() -> None:
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = {p.__name__ for p in Plugins.instance().discover(Sweeper)}
    assert "MasksweepOptunaSweeper" in names


def test_config_store_has_sweeper_sampler_and_pruner_groups() -> None:
    import hydra_plugins.masksweep_optuna.config  # noqa: F401  (registers the nodes)

    repo = ConfigStore.instance().repo
    assert "masksweep_optuna.yaml" in repo["hydra"]["sweeper"]
    assert {"tpe.yaml", "grid.yaml", "cmaes.yaml"} <= set(repo["hydra"]["sweeper"]["sampler"])
    assert {"median.yaml", "none.yaml", "hyperband.yaml"} <= set(repo["hydra"]["sweeper"]["pruner"])


# ---------------------------------------------------------------------------------------------- search space
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("lr=tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("momentum=interval(0.8, 0.99)", FloatDistribution(0.8, 0.99)),
        ("optimizer=choice(sgd, adam)", CategoricalDistribution(["sgd", "adam"])),
        ("lr=0.001,0.01", CategoricalDistribution([0.001, 0.01])),
        ("epochs=range(5, 10)", IntDistribution(5, 9)),  # Hydra's range excludes its stop
        ("epochs=range(2, 11, 3)", IntDistribution(2, 8, step=3)),
        ("epochs=range(10, 0, -3)", IntDistribution(1, 10, step=3)),
        ("frac=range(0, 1, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
        ("batch=int(interval(1, 10))", IntDistribution(1, 10)),
        ("width=tag(log, int(interval(8, 256)))", IntDistribution(8, 256, log=True)),
        ("width=int(tag(log, interval(8, 256)))", IntDistribution(8, 256, log=True)),
        ("depth=tag(log, range(1, 9))", IntDistribution(1, 8, log=True)),
        ("seed=shuffle(range(3))", CategoricalDistribution([0, 1, 2])),
        ("flag=true,false", CategoricalDistribution([True, False])),
    ],
)
def test_search_space_forms(line: str, expected: object) -> None:
    space = parse_search_space(None, [line])
    ((_, dist),) = space.distributions.items()
    assert dist == expected


def test_params_and_command_line_merge_with_fixed_values() -> None:
    params = {"lr": "tag(log, interval(1e-4, 1e-2))", "epochs": "range(5, 10)", "trainer": "smoke"}
    space = parse_search_space(params, ["sweep=tpe", "lr=0.001,0.01", "+extra=choice(1, 2)", "epochs=7"])
    assert space.distributions["lr"] == CategoricalDistribution([0.001, 0.01])  # the command line wins
    assert "epochs" not in space.distributions  # fixed on the command line
    assert space.fixed == ["trainer=smoke", "sweep=tpe", "epochs=7"]
    assert space.override_keys["extra"] == "+extra"
    assert space.job_overrides({"lr": 0.01, "extra": 2}) == [
        "trainer=smoke",
        "sweep=tpe",
        "epochs=7",
        "lr=0.01",
        "+extra=2",
    ]


def test_choice_of_structures_is_written_back_verbatim() -> None:
    space = parse_search_space({"sizes": "choice([1,2],[3,4])"}, [])
    assert space.distributions["sizes"] == CategoricalDistribution(["[1,2]", "[3,4]"])
    assert space.job_overrides({"sizes": "[3,4]"}) == ["sizes=[3,4]"]


@pytest.mark.parametrize(
    "line",
    [
        "x=tag(log, interval(0, 1))",
        "x=tag(log, choice(1, 2))",
        "x=tag(log, range(0.1, 1, 0.1))",
        "x=interval(2,1)",
    ],
)
def test_bad_search_spaces_are_rejected(line: str) -> None:
    with pytest.raises(SearchSpaceError):
        parse_search_space(None, [line])


def test_grid_space_from_discrete_params_and_error_on_interval() -> None:
    space = parse_search_space(
        {"opt": "choice(sgd, adam)", "epochs": "range(2, 5)", "f": "range(0, 1, 0.5)"}, []
    )
    assert grid_space(space) == {"opt": ["sgd", "adam"], "epochs": [2, 3, 4], "f": [0.0, 0.5]}
    with pytest.raises(SearchSpaceError, match="continuous interval"):
        grid_space(parse_search_space({"lr": "interval(0.1, 1)"}, []))


@pytest.mark.parametrize(
    "value",
    [
        "adam",
        "1",
        "true",
        "a,b",
        "a b",
        "it's",
        "x${y}z",
        "back\\slash\\",
        "postgresql://u:p@h:5432/db",
        "journal:///tmp/a b/c.journal",
        3,
        0.001,
        1e-7,
        True,
        None,
        float("inf"),
    ],
)
def test_override_values_read_back_exactly(value: object) -> None:
    text = format_value(value)
    override = OverridesParser.create().parse_override(f"k={text}")
    resolved = OmegaConf.create({"k": override.value()}).k
    assert resolved == value and type(resolved) is type(value)
    assert format_value("adam") == "adam"  # config-group options stay plain


def test_quote_is_used_for_identity_values() -> None:
    assert quote("toy") == "'toy'"
    assert OverridesParser.create().parse_override("k=" + quote("a'b")).value() == "a'b"


def test_nan_param_value_round_trips() -> None:
    override = OverridesParser.create().parse_override(f"k={format_value(float('nan'))}")
    assert math.isnan(override.value())


# ---------------------------------------------------------------------------------------------- storages
def test_storage_forms(tmp_path: Path) -> None:
    default = B.parse_storage(None, "my study", cwd=tmp_path)
    assert default.kind == "journal"
    assert default.path == tmp_path / "mlruns" / "optuna" / "my_study.journal"
    assert default.url == f"journal://{tmp_path}/mlruns/optuna/my_study.journal"
    assert B.parse_storage(default.url, "x").path == default.path  # the form jobs receive reads back
    assert (
        B.parse_storage("journal://rel/s.journal", "x", cwd=tmp_path).path == tmp_path / "rel" / "s.journal"
    )
    assert B.parse_storage("runs/s.journal", "x", cwd=tmp_path).path == tmp_path / "runs" / "s.journal"
    sqlite = B.parse_storage("sqlite:///db/o.db", "x", cwd=tmp_path)
    assert (sqlite.kind, sqlite.dialect, sqlite.url) == ("rdb", "sqlite", f"sqlite:///{tmp_path}/db/o.db")
    pg = B.parse_storage("postgresql://user:secret@db:5432/optuna", "x")
    assert (pg.kind, pg.dialect) == ("rdb", "postgresql")
    assert "secret" in pg.url and "secret" not in pg.describe()
    for bad in ("sqlite://", "redis://h", "optuna.db", "journal:"):
        with pytest.raises(B.StorageSpecError):
            B.parse_storage(bad, "x", cwd=tmp_path)


def test_journal_storage_and_file_lock(tmp_path: Path) -> None:
    spec = B.parse_storage(None, "s", cwd=tmp_path)
    storage = B.open_storage(spec)
    optuna.create_study(study_name="s", storage=storage)
    lock = B.study_lock(spec, "s")
    assert lock.exact
    with lock.hold():
        assert spec.path is not None and spec.path.exists()


def test_pruner_specs_build_optuna_pruners() -> None:
    spec = B.pruner_spec({"name": "median", "n_startup_trials": 2, "n_warmup_steps": None, "percentile": 10})
    assert spec == {"name": "median", "kwargs": {"n_startup_trials": 2}}  # percentile is not median's
    assert isinstance(B.build_pruner(spec), optuna.pruners.MedianPruner)
    assert B.pruner_spec({"name": "percentile"})["kwargs"] == {"percentile": 25.0}
    for name, cls in [
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ]:
        assert isinstance(B.build_pruner(B.pruner_spec({"name": name, "min_resource": 1})), cls)
    with pytest.raises(ValueError, match="unknown"):
        B.pruner_spec({"name": "wilcoxonish"})


# ---------------------------------------------------------------------------------------------- samplers
def test_samplers_and_their_limits() -> None:
    mixed = parse_search_space({"opt": "choice(a, b)", "lr": "interval(0.1, 1)"}, [])
    numeric = parse_search_space({"lr": "interval(0.1, 1)", "n": "range(1, 4)"}, [])
    assert isinstance(build_sampler({"name": "tpe", "seed": 1}, mixed, 0), optuna.samplers.TPESampler)
    assert isinstance(build_sampler({"name": "random"}, mixed, 0), optuna.samplers.RandomSampler)
    assert isinstance(
        build_sampler({"name": "qmc", "qmc_type": "halton"}, mixed, 0), optuna.samplers.QMCSampler
    )
    assert isinstance(build_sampler({"name": "cmaes"}, numeric, 0), optuna.samplers.CmaEsSampler)
    with pytest.raises(SweepError, match="categorical"):
        build_sampler({"name": "cmaes"}, mixed, 0)
    with pytest.raises(SearchSpaceError, match="continuous interval"):
        build_sampler({"name": "grid"}, mixed, 0)
    with pytest.raises(SweepError, match="unknown"):
        build_sampler({"name": "bayes"}, mixed, 0)


def test_settings_validation() -> None:
    assert Settings(heartbeat_interval=10).grace_period == 80
    with pytest.raises(SweepError, match="direction"):
        Settings(direction="up")
    with pytest.raises(SweepError, match="grace_period"):
        Settings(heartbeat_interval=10, grace_period=5)


# ---------------------------------------------------------------------------------------------- outcomes
def _ret(status: JobStatus, value: object) -> JobReturn:
    ret = JobReturn(status=status)
    ret._return_value = value
    return ret


def test_classify_job_returns() -> None:
    ok = classify(_ret(JobStatus.COMPLETED, 0.5))
    assert (ok.state, ok.value) == (TrialState.COMPLETE, 0.5)
    from_dict = classify(_ret(JobStatus.COMPLETED, {"val/ap_segm": 0.25}), "val/ap_segm")
    assert (from_dict.state, from_dict.value) == (TrialState.COMPLETE, 0.25)
    for bad, why in [
        (float("nan"), "not a finite"),
        (None, "returned None"),
        ("good", "must return a float"),
        (True, "must return a float"),
        ({"loss": 1.0}, "optimized metric"),
    ]:
        out = classify(_ret(JobStatus.COMPLETED, bad), "val/ap_segm")
        assert out.state == TrialState.FAIL and why in out.user_attrs["error"]

    div = classify(_ret(JobStatus.FAILED, TrialDiverged(reason="loss is inf", step=7, value=float("inf"))))
    assert div.state == TrialState.PRUNED
    assert div.user_attrs == {
        "diverged": True,
        "divergence_reason": "loss is inf",
        "divergence_step": 7,
        "divergence_detected_at": 7,
        "divergence_value": "inf",
    }
    pruned = classify(
        _ret(JobStatus.FAILED, TrialPruned(reason="pruner median at epoch 2", step=2, value=0.1))
    )
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["pruned_step"] == 2
    crash = classify(_ret(JobStatus.FAILED, RuntimeError("CUDA out of memory")))
    assert crash.state == TrialState.FAIL and crash.user_attrs["error"] == "RuntimeError: CUDA out of memory"


# ---------------------------------------------------------------------------------------------- stale trials
def test_time_based_reaping_on_journal_storage(tmp_path: Path) -> None:
    spec = B.parse_storage(None, "stale", cwd=tmp_path)
    storage = B.open_storage(spec)
    study = optuna.create_study(study_name="stale", storage=storage)
    me = WorkerIdentity.current()
    elsewhere = {"host": "other-node", "pid": 1, "boot": None, "pidns": None, "id": "x"}
    dist = FloatDistribution(0, 1)

    old = study.ask({"x": dist})
    storage.set_trial_system_attr(old._trial_id, B.WORKER_ATTR, elsewhere)
    storage.set_trial_system_attr(old._trial_id, B.HEARTBEAT_ATTR, time.time() - 100)
    fresh = study.ask({"x": dist})
    storage.set_trial_system_attr(fresh._trial_id, B.WORKER_ATTR, elsewhere)
    storage.set_trial_system_attr(fresh._trial_id, B.HEARTBEAT_ATTR, time.time())
    mine = study.ask({"x": dist})
    storage.set_trial_system_attr(mine._trial_id, B.WORKER_ATTR, me.as_attr())
    storage.set_trial_system_attr(mine._trial_id, B.HEARTBEAT_ATTR, time.time() - 100)  # own trials never

    reaped = reap_stale_trials(study, storage, "journal", me, grace_period=10, max_retry=1)
    assert reaped == [old.number]
    trials = study.get_trials()
    assert trials[old.number].state == TrialState.FAIL
    assert "no heartbeat from other-node:1" in trials[old.number].user_attrs["error"]
    assert (
        trials[fresh.number].state == TrialState.RUNNING and trials[mine.number].state == TrialState.RUNNING
    )
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == trials[old.number].params
    assert retry.system_attrs[B.RETRY_FROM_ATTR] == old.number
    assert B.WORKER_ATTR not in retry.system_attrs and "error" not in retry.user_attrs

    # The retry runs and goes stale too: max_retry=1 stops a second retry.
    popped = study.ask({"x": dist})
    assert popped.number == retry.number and popped.params == retry.params
    storage.set_trial_system_attr(popped._trial_id, B.WORKER_ATTR, elsewhere)
    storage.set_trial_system_attr(popped._trial_id, B.HEARTBEAT_ATTR, time.time() - 100)
    assert reap_stale_trials(study, storage, "journal", me, grace_period=10, max_retry=1) == [popped.number]
    assert not study.get_trials(states=(TrialState.WAITING,))
