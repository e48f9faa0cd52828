"""Shared fixtures: Hydra configs built with compose(), run inside a temporary working directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from masksweep.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]

# A trial small enough for a 2-core CPU: tiny model, 64 px synthetic images, two steps per epoch.
TINY_OVERRIDES = [
    "trainer=smoke",
    "data.image_size=64",
    "data.num_train=4",
    "data.num_val=2",
    "epochs=1",
    "++model.pretrain.enabled=false",  # pretraining has its own test; trials here start from random weights
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory, so ./mlruns and ./.cache are the test's own."""
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
        return compose(config_name="train", overrides=[*base, *overrides])

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield _make
