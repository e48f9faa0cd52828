"""Shared fixtures: Hydra configs built with compose(), run inside a temporary working directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from masksweep.configs import CONFIG_MODULE, CONFIG_NAME

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["slurm_cluster"]  # the session's one-node SLURM cluster for tests marked slurm

# A trial small enough for a 2-core CPU: tiny model, 64 px synthetic images, two steps per epoch.
TINY_OVERRIDES = [
    "trainer=smoke",
    "data.image_size=64",
    "model.min_size=64",  # the tiny preset feeds 128 px by default; keep test images at their own size
    "model.max_size=64",
    "data.num_train=4",
    "data.num_val=2",
    "epochs=1",
    "++model.pretrain.enabled=false",  # pretraining has its own test; trials here start from random weights
]


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their store: an exported MLFLOW_TRACKING_URI (honoured by masksweep) must not reroute."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty masksweep cache (pretraining, synthetic data, decoded-image records): none
    writes to the user's ~/.cache, and subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("masksweep-cache")
    monkeypatch.setenv("MASKSWEEP_CACHE_DIR", str(path))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory, so ./mlruns and ./outputs are the test's own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for the whole session: generation is deterministic and keyed by its params."""
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture
def make_cfg(workdir: Path, synthetic_cache: Path) -> Iterator[Callable[..., DictConfig]]:
    """compose() the training config with overrides; tiny-sized unless `tiny=False`."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = [*TINY_OVERRIDES, f"data.cache_dir={synthetic_cache}"] if tiny else []
        return compose(config_name=CONFIG_NAME, overrides=[*base, *overrides])

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        yield _make


def signal_once_logged(
    command: list[str], cwd: Path, marker: str, signum: int, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run `command` with stdout to cwd/stdout.txt, send `signum` once `marker` is in it; (status, stderr)."""
    import subprocess
    import time

    log_path = cwd / "stdout.txt"
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 600
        while marker not in log_path.read_text() and child.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=300)
    return child.returncode, stderr
