"""A cluster that cannot run the sweep is one line before any job is submitted (no SLURM needed: fake
commands on PATH stand in for a cluster without accounting, and for a machine without SLURM)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hydra_plugins.masksweep_optuna._launch import check_slurm
from hydra_plugins.masksweep_optuna._settings import SweepError


def fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_a_cluster_without_accounting_is_named_instead_of_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake(tmp_path, "sbatch", "exit 0")
    fake(tmp_path, "scontrol", "exit 0")
    # What slurm 22.05's sacct prints with AccountingStorageType=accounting_storage/none.
    fake(tmp_path, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SweepError) as err:
        check_slurm({"partition": "debug"})
    assert str(err.value).startswith(
        "SLURM accounting does not answer (sacct: Slurm accounting storage is disabled); the sweep needs it "
        "to see cancelled and failed jobs end"
    )


def test_no_slurm_on_the_machine_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(SweepError, match=r"needs SLURM's `sbatch` on PATH.*hydra/launcher=submitit_local"):
        check_slurm({})
