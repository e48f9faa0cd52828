"""The sweep plugin's own bad inputs: one line naming the setting, a non-zero exit, no traceback, and nothing
recorded (no study, no MLflow parent run), because they are caught before either is made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

TRAIN = str(Path(sys.executable).with_name("masksweep-train"))


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("lr=interval(1e-2, 1e-4)", "lr"),
        ("lr=tag(log, interval(0, 1e-2))", "lr"),
        ("hydra.sweeper.sampler.name=foo", "hydra.sweeper.sampler.name"),
        ("lr=choice(-1)", "lr"),
        ("optimizer=choice(sgd, nosuch)", "optimizer=nosuch"),
        ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs"),
    ],
)
def test_a_bad_sweep_setting_is_one_line_before_anything_is_recorded(
    workdir: Path, bad: str, named: str
) -> None:
    result = subprocess.run(
        [TRAIN, "-m", "sweep=lr_wd", *TINY_OVERRIDES, bad],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("masksweep-train: ") and named in lines[0], lines
    assert not (workdir / "mlruns").exists()  # no Optuna journal, no MLflow store, so no FAILED parent run
