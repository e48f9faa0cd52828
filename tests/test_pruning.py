"""TrialReporter: reaching a trial asked by another process through the shared storage, reporting, pruning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from masksweep.errors import ConfigError, TrialPruned, TrialStopped
from masksweep.study import TrialReporter
from masksweep.study import storage as B

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sweeper_side(tmp_path: Path, pruner: dict[str, object]) -> tuple[optuna.Study, str]:
    """What the sweeper does: a study in the default journal storage, with its pruner spec stored in it."""
    spec = B.parse_storage(None, "reporting", cwd=tmp_path)
    storage = B.open_storage(spec)
    study = optuna.create_study(study_name="reporting", storage=storage, direction="maximize")
    study_id = storage.get_study_id_from_name("reporting")
    storage.set_study_system_attr(study_id, B.PRUNER_ATTR, B.pruner_spec(pruner))
    return study, spec.url


def _cfg(url: str | None, number: int | None) -> object:
    return OmegaConf.create({"storage": url, "study_name": "reporting", "trial_number": number})


def test_outside_a_sweep_there_is_no_reporter() -> None:
    assert TrialReporter.from_config(_cfg(None, None)) is None
    assert TrialReporter.from_config(None) is None


def test_reports_reach_the_trial_and_the_pruner_prunes_a_worse_one(tmp_path: Path) -> None:
    study, url = _sweeper_side(tmp_path, {"name": "median", "n_startup_trials": 1})
    good = study.ask({"x": FloatDistribution(0, 1)})
    reporter = TrialReporter.from_config(_cfg(url, good.number))
    assert reporter is not None and reporter.number == good.number and "x" in reporter.params
    for step in range(3):
        reporter.report(0.5 + step, step)  # never pruned: the first trial is the startup trial
    reporter.set_user_attr("note", "from the job")
    study.tell(good, 2.5)
    stored = study.trials[good.number]
    assert stored.intermediate_values == {0: 0.5, 1: 1.5, 2: 2.5}
    assert stored.user_attrs["note"] == "from the job"

    bad = study.ask({"x": FloatDistribution(0, 1)})
    reporter = TrialReporter.from_config(_cfg(url, bad.number))
    assert reporter is not None and reporter.pruner_name == "median"
    with pytest.raises(TrialPruned) as caught:
        reporter.report(-10.0, 0)
    assert caught.value.reason == "pruner median at epoch 0"
    assert (caught.value.step, caught.value.value) == (0, -10.0)


def test_no_pruner_never_prunes(tmp_path: Path) -> None:
    study, url = _sweeper_side(tmp_path, {"name": "none"})
    study.tell(study.ask(), 1.0)
    trial = study.ask()
    reporter = TrialReporter.from_config(_cfg(url, trial.number))
    assert reporter is not None
    reporter.report(-100.0, 0)
    reporter.report(-100.0, 1)


def test_a_trial_finished_elsewhere_stops_the_job(tmp_path: Path) -> None:
    study, url = _sweeper_side(tmp_path, {"name": "median"})
    trial = study.ask()
    reporter = TrialReporter.from_config(_cfg(url, trial.number))
    assert reporter is not None
    study.tell(trial, state=TrialState.FAIL)  # e.g. taken for stale by another worker
    with pytest.raises(TrialStopped, match="already finished"):
        reporter.report(1.0, 0)


def test_bad_identity_is_a_config_error(tmp_path: Path) -> None:
    study, url = _sweeper_side(tmp_path, {"name": "median"})
    with pytest.raises(ConfigError, match=r"optuna\.storage"):
        TrialReporter.from_config(_cfg(None, 0))
    with pytest.raises(ConfigError, match="trial_number"):
        TrialReporter.from_config(_cfg(url, 5))
    missing = OmegaConf.create({"storage": url, "study_name": "nope", "trial_number": 0})
    with pytest.raises(ConfigError, match="study_name"):
        TrialReporter.from_config(missing)
    study.tell(study.ask(), 1.0)
    with pytest.raises(ConfigError, match="RUNNING"):
        TrialReporter.from_config(_cfg(url, 0))


def test_a_trial_asked_here_is_reported_from_another_process(tmp_path: Path) -> None:
    """What a process launcher (joblib, submitit) does: the job runs in a process of its own."""
    study, url = _sweeper_side(tmp_path, {"name": "none"})
    trial = study.ask({"x": FloatDistribution(0, 1)})
    identity = {"storage": url, "study_name": "reporting", "trial_number": 0}
    code = (
        "from masksweep.study import TrialReporter\n"
        f"r = TrialReporter.from_config({identity!r})\n"
        "r.report(0.25, 0)\n"
        "r.report(0.75, 1)\n"
        "r.set_user_attr('pid', __import__('os').getpid())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    study.tell(trial, 0.75)
    stored = study.trials[0]
    assert stored.intermediate_values == {0: 0.25, 1: 0.75}
    assert stored.user_attrs["pid"] != os.getpid()
