"""`masksweep reproduce RUN_ID`: a logged run replays to identical metrics on the CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from masksweep import cli
from masksweep import reproduce as reproduce_module
from masksweep.reproduce import git_warnings, replay_config
from masksweep.tracking import experiment_id, open_client
from masksweep.train import train


@pytest.mark.slow
def test_replay_has_identical_params_and_metrics_on_cpu(make_cfg, workdir: Path, capsys) -> None:
    source = train(make_cfg("device=cpu", "scheduler.warmup.iters=1"))
    code = cli.main(["reproduce", source["run_id"][:8], "--check"])  # as `compare` prints it
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"metrics identical to run {source['run_id']}" in captured.err

    client, _ = open_client(None, create=False)
    source_run = client.get_run(source["run_id"])
    replays = client.search_runs(
        [source_run.info.experiment_id], f"tags.`masksweep.reproduced_from` = '{source['run_id']}'"
    )
    assert len(replays) == 1
    replay = replays[0]
    assert replay.info.run_id != source["run_id"] and replay.info.status == "FINISHED"
    for key, value in source.items():
        if key != "run_id":
            assert replay.data.metrics[key] == value, key  # bit for bit
    assert replay.data.params == source_run.data.params
    history = [client.get_metric_history(r.info.run_id, "train/loss") for r in (source_run, replay)]
    assert [m.value for m in history[0]] == [m.value for m in history[1]] and len(history[0]) == 2
    assert "Final metrics" in captured.out and "val/ap_segm" in captured.out


def test_replay_config_is_a_standalone_tracked_trial() -> None:
    logged = OmegaConf.create(
        {
            "epochs": 5,
            "device": "auto",
            "lr": 0.001,
            "optuna": {"storage": "postgresql://u:***@h/db", "study_name": "s", "trial_number": 3},
            "tracking": {"enabled": True, "uri": "http://u:***@team:5000", "experiment_name": "masksweep"},
        }
    )
    cfg = replay_config(logged, None, ["epochs=2", "device=cpu", "lr=1e-4"])
    assert (cfg.optuna.storage, cfg.optuna.study_name, cfg.optuna.trial_number) == (None, None, None)
    assert cfg.tracking.uri is None and cfg.tracking.enabled is True
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int) and cfg.device == "cpu" and cfg.lr == 1e-4
    assert logged.epochs == 5  # the logged config is left alone


def fake_run(**params: str) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params, tags={}))


def test_other_git_commit_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reproduce_module, "provenance", lambda: {"git.commit": "b" * 40})
    warnings = git_warnings(fake_run(**{"git.commit": "a" * 40, "git.dirty": "True"}))
    assert len(warnings) == 2
    assert "aaaaaaaaaaaa" in warnings[0] and "bbbbbbbbbbbb" in warnings[0]
    assert "uncommitted changes" in warnings[1]
    assert git_warnings(fake_run(**{"git.commit": "b" * 40, "git.dirty": "False"})) == []
    assert "cannot compare" in git_warnings(fake_run())[0]


def test_unknown_run_and_run_without_config_are_one_line_errors(workdir: Path, capsys) -> None:
    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    bare = client.create_run(exp).info.run_id
    assert cli.main(["reproduce", "0" * 32]) == 1
    assert f"run '{'0' * 32}' not found" in capsys.readouterr().err
    assert cli.main(["reproduce", bare]) == 1
    err = capsys.readouterr().err
    assert "has no config.yaml artifact" in err and len(err.strip().splitlines()) == 1
