"""Where the configs come from (the `masksweep.conf` package), a user's config directory, and `--help`.
The same from an installed wheel: tests/test_wheel.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from masksweep import cli
from masksweep.configs import CONFIG_DIR, CONFIG_MODULE, CONFIG_NAME, compose_train, with_config_dir
from masksweep.errors import ConfigError, MasksweepError

TRAIN = str(Path(sys.executable).with_name("masksweep-train"))


@pytest.fixture(scope="module")
def help_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    cwd = tmp_path_factory.mktemp("help")
    result = subprocess.run([TRAIN, "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ntrial_name: mine\nlr: 0.0123\n")
    return tmp_path


def test_hydra_reads_the_configs_from_the_package() -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=["sweep=seed_table"], return_hydra_config=True)
    sources = [(s.provider, s.schema, s.path) for s in cfg.hydra.runtime.config_sources]
    assert ("main", "pkg", "masksweep.conf") in sources
    assert cfg.hydra.sweeper.params.experiment.startswith("choice(trial1")


def test_help_names_masksweep_train_not_hydra(help_text: str) -> None:
    assert help_text.startswith("masksweep-train: ")
    assert "is powered by Hydra" not in help_text
    assert "masksweep-train -m sweep=seed_table" in help_text


def test_help_lists_every_group_with_its_options(help_text: str) -> None:
    groups = [p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")]
    assert len(groups) >= 9
    for group in groups:
        options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        assert f"\n{group.name}: {options}\n" in help_text


def test_help_lists_the_reports_trials_as_their_configs_set_them(help_text: str) -> None:
    listed = dict(re.findall(r"^  (trial\d)  (.+)$", help_text, flags=re.MULTILINE))
    trials = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("trial*.yaml"))
    assert sorted(listed) == trials
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for trial in trials:
            cfg = compose(config_name=CONFIG_NAME, overrides=[f"experiment={trial}"])
            scheduler = cfg.scheduler.lr_scheduler
            settings = (
                f"{cfg.optimizer._target_.rsplit('.', 1)[1]}, "
                f"{'none' if scheduler is None else scheduler._target_.rsplit('.', 1)[1]}, lr {cfg.lr}, "
                f"momentum {'none' if cfg.momentum is None else cfg.momentum}, "
                f"weight decay {cfg.weight_decay}, {cfg.epochs} epochs"
            )
            assert listed[trial].startswith(settings), trial


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_compose_train_finds_a_users_experiment(user_dir: Path, how: str) -> None:
    overrides = ["experiment=mine"]
    if how == "--config-dir":
        overrides = with_config_dir(user_dir, overrides)
    else:
        overrides = [f"hydra.searchpath=[file://{user_dir}]", *overrides]
    cfg = compose_train(overrides)
    assert (cfg.trial_name, cfg.lr) == ("mine", 0.0123)


def test_a_bad_config_dir_is_named(tmp_path: Path, user_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config-dir=.*missing.*existing directory"):
        with_config_dir(tmp_path / "missing", [])
    with pytest.raises(ConfigError, match="not both"):
        with_config_dir(user_dir, ["hydra.searchpath=[file:///elsewhere]"])


def test_an_unknown_option_is_one_line_with_the_choices() -> None:
    with pytest.raises(MasksweepError) as caught:
        compose_train(["data=nope"])
    message = str(caught.value)
    assert "\n" not in message and "data/nope" in message and "synthetic" in message


def test_evaluate_names_a_missing_config_dir_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    args = ["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--config-dir", str(missing), "data=mine"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config-dir" in err and str(missing) in err
