"""The held-out test split (issue 15 item 9): built only when data.test is set, never read by training,
scored once for a finished run by `evaluate_run_on_test` or `masksweep evaluate --split test`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_factories import data_cfg, pennfudan_layout
from masksweep.data import build_datasets, build_split
from masksweep.errors import ConfigError
from masksweep.metrics import METRIC_KEYS


def test_no_test_split_unless_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = data_cfg("synthetic", num_train=2, num_val=1, image_size=32)
    assert build_datasets(cfg).test is None
    with pytest.raises(
        ConfigError, match=r"data\.test=None is invalid; allowed: a test split for data=synthetic"
    ):
        build_split(cfg, "test")


def test_pennfudan_three_way_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    label_map = np.zeros((12, 20), dtype=np.uint8)
    label_map[2:10, 3:9] = 1
    root = pennfudan_layout(tmp_path / "ped", {f"P{i:03d}": label_map for i in range(20)})
    splits = build_datasets(data_cfg("pennfudan", root=str(root), val_fraction=0.2, test=0.25))
    names = [{p.name for p in d.image_paths} for d in (splits.train, splits.val, splits.test)]
    assert [len(n) for n in names] == [11, 4, 5]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    two_way = build_datasets(data_cfg("pennfudan", root=str(root), val_fraction=0.2))
    assert {p.name for p in two_way.val.image_paths} == names[1]  # adding a test split leaves val alone


@pytest.mark.parametrize("test", [0.0, 0.9, "half"])
def test_a_bad_test_fraction_is_a_config_error(tmp_path: Path, test: object) -> None:
    label_map = np.zeros((4, 4), dtype=np.uint8)
    label_map[1:3, 1:3] = 1
    root = pennfudan_layout(tmp_path / "ped", {"a": label_map, "b": label_map})
    with pytest.raises(ConfigError, match=r"data\.test="):
        build_datasets(data_cfg("pennfudan", root=str(root), test=test))


@pytest.mark.slow
def test_a_finished_run_is_scored_on_its_test_split_once_asked(make_cfg, workdir: Path) -> None:
    from mlflow import MlflowClient

    from masksweep.cli import main
    from masksweep.rescore import evaluate_run_on_test
    from masksweep.tracking import default_store
    from masksweep.train import train

    trained = train(make_cfg("data.test=2"))
    run_id = trained["run_id"]
    client = MlflowClient(default_store()[0])
    assert not [
        k for k in client.get_run(run_id).data.metrics if k.startswith("test/")
    ]  # training never reads it

    metrics = evaluate_run_on_test(run_id)
    assert set(metrics) == {f"test/{k}" for k in METRIC_KEYS}
    logged = client.get_run(run_id).data.metrics
    assert {k: logged[k] for k in metrics} == metrics

    assert main(["evaluate", "--run", run_id, "--split", "test"]) == 0  # the same numbers, the same names
    again = client.get_run(run_id).data.metrics
    assert {k: again[k] for k in metrics} == metrics


@pytest.mark.slow
def test_a_study_scores_only_its_best_trial_on_the_test_split_at_its_end(
    workdir: Path, synthetic_cache: Path
) -> None:
    import subprocess
    import sys

    from mlflow import MlflowClient

    from conftest import TINY_OVERRIDES
    from masksweep.tracking import default_store
    from test_sweep_e2e import runs_of, study_of

    command = [
        str(Path(sys.executable).with_name("masksweep-train")),
        "-m",
        "hydra/sweeper=masksweep_optuna",
        "hydra.sweeper.study_name=held-out",
        f"hydra.sweep.dir={workdir / 'sweep'}",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.pruner.name=none",
        "hydra.sweeper.n_trials=3",
        *TINY_OVERRIDES,
        f"data.cache_dir={synthetic_cache}",
        "data.test=2",
        "optimized_metric=val/iou_global",  # differs between trials even from random weights
        "lr=0.0005,0.001,0.002",
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    study = study_of(workdir, "held-out")
    best = study.best_trial
    runs = {int(run.data.tags["optuna.trial_number"]): run for run in runs_of(workdir, "held-out")}
    assert sorted(runs) == [t.number for t in study.trials]
    scored = {n for n, run in runs.items() if any(k.startswith("test/") for k in run.data.metrics)}
    assert scored == {best.number}  # the best by val, once; the others never see the test split
    test_metrics = {k: v for k, v in runs[best.number].data.metrics.items() if k.startswith("test/")}
    assert set(test_metrics) == {f"test/{k}" for k in METRIC_KEYS}

    client = MlflowClient(default_store(workdir)[0])
    parent = client.get_run(runs[best.number].data.tags["mlflow.parentRunId"])
    assert {k: parent.data.metrics[k] for k in test_metrics} == test_metrics
    # Scored after the last trial ended: no report to Optuna (pruning, selection) could have read it.
    logged_at = min(m.timestamp for m in client.get_metric_history(parent.info.run_id, "test/ap_segm"))
    last_end = max(t.datetime_complete.timestamp() for t in study.trials)
    assert logged_at / 1000 >= last_end
    for trial in study.trials:  # each value is the trial's own val metric
        val = client.get_metric_history(runs[trial.number].info.run_id, "val/iou_global")
        assert trial.value == pytest.approx(val[-1].value)
