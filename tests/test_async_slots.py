"""No idle slots: with n_jobs=2 a new trial starts the moment any trial ends, not when its batch-mate does;
and every trial's compute is on the record (system metrics, device-seconds, the study's hours, utilization).
A real `masksweep-train -m` sweep of the tiny preset through submitit_local (CPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from masksweep.tracking import default_store
from test_sweep_e2e import runs_of, study_of, sweep_command

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_slots_stay_busy_while_a_long_trial_runs(workdir: Path, synthetic_cache: Path) -> None:
    command = sweep_command(
        synthetic_cache,
        workdir / "sweep",
        "slots",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=15",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.sampler.seed=3",  # grid order: 1, 5, 5, 1 epochs (a short trial ends first)
        "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.n_trials=4",
        "epochs=choice(5, 1)",
        "seed=choice(1, 2)",
        "tracking.system_metrics_every_s=1",
    )
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    trials = sorted(study_of(workdir, "slots").trials, key=lambda t: t.datetime_start)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)  # no ask past the budget
    assert [t.params["epochs"] for t in trials] == [1, 5, 5, 1]
    # While the budget lasted, every trial that ended was followed by a new one at once, also the short one
    # that ended while its slot-mate still had epochs to go (a batch would have waited for the long one).
    starts = [t.datetime_start for t in trials]
    for end in sorted(t.datetime_complete for t in trials)[:2]:
        gap = min(((s - end).total_seconds() for s in starts if s >= end), default=float("inf"))
        assert gap < 5, f"a slot stayed idle {gap:.1f} s after a trial ended"

    uri = default_store(workdir)[0]
    client = MlflowClient(uri)
    for run in runs_of(workdir, "slots"):
        keys = set(run.data.metrics)
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
        assert run.data.metrics["time/device_seconds"] > 0 and run.data.metrics["time/wall_seconds"] > 0
    for t in trials:  # the Optuna side of the same record, which the study's compute sums
        compute = t.user_attrs["compute"]
        assert compute["device"] == "cpu" and compute["epochs_done"] == t.params["epochs"]

    results = yaml.safe_load((workdir / "sweep" / "optimization_results.yaml").read_text())
    compute = results["compute"]
    assert compute["device_hours"] == pytest.approx(
        sum(t.user_attrs["compute"]["device_s"] for t in trials) / 3600, rel=1e-3
    )
    assert compute["saved_device_hours"] == 0  # nothing was stopped early
    assert 0.5 < compute["slot_utilization"] <= 1.0
    experiment = client.get_experiment_by_name("masksweep")
    parent = client.search_runs([experiment.experiment_id], "tags.`masksweep.role` = 'sweep'")[0]
    assert parent.data.metrics["compute.device_hours"] == pytest.approx(compute["device_hours"])
    assert parent.data.metrics["compute.slot_utilization"] == pytest.approx(compute["slot_utilization"])

    shown = subprocess.run(
        [
            str(Path(os.environ.get("VIRTUAL_ENV", Path(command[0]).parent.parent)) / "bin" / "masksweep"),
            "compare",
            "--tracking-uri",
            uri,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "device-hours" in shown.stdout and "slot utilization" in shown.stdout
