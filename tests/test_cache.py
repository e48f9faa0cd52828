"""One masksweep cache per user (issue 21): every working directory shares the pretraining and the data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from masksweep.cache import cache_dir
from masksweep.train import train


def test_the_cache_is_the_env_var_else_xdg_else_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKSWEEP_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MASKSWEEP_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "masksweep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "masksweep"


@pytest.mark.slow
def test_a_second_working_directory_does_not_pretrain_again(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    xdg = tmp_path / "xdg"
    monkeypatch.delenv("MASKSWEEP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    overrides = (
        "tracking=none",
        "data.cache_dir=null",  # the synthetic data goes to the user's cache too
        "++model.pretrain.enabled=true",
        "model.pretrain.steps=1",
        "model.pretrain.num_images=2",
        "model.pretrain.batch_size=2",
        "model.pretrain.warmup_iters=1",
    )
    logs = []
    for name in ("project-a", "project-b"):
        directory = tmp_path / name
        directory.mkdir()
        monkeypatch.chdir(directory)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="masksweep"):
            train(make_cfg(*overrides))
        logs.append(caplog.text)
        assert not (directory / ".cache").exists()
    assert "Pretraining maskrcnn_resnet18_fpn once" in logs[0]
    assert "Pretraining" not in logs[1] and "Generating the synthetic" not in logs[1]
    assert f"Starting from the pretrained weights cached at {xdg / 'masksweep' / 'pretrained'}" in logs[1]
    assert len(list((xdg / "masksweep" / "pretrained").glob("*.pt"))) == 1
