"""The `slurm_cluster` fixture: a real one-node SLURM cluster with accounting (scripts/slurm-cluster), started
once per session for the tests marked `slurm`, plus the few helpers those tests use to watch and hit jobs.

MASKSWEEP_TEST_SLURM_DIR=DIR reuses a cluster already started with `scripts/slurm-cluster start DIR` (fast
local iteration); it is left running. The helpers read SLURM_CONF, which the fixture sets for the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-cluster"
# Daemons and clients the script and the tests call; the daemons live in sbin.
TOOLS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "scontrol")
SEARCH_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
NOT_INSTALLED = (
    "SLURM is not installed: apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server, "
    "as .ci/run does"
)
T = TypeVar("T")


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    conf: Path  # slurm.conf, also exported as SLURM_CONF
    cpus: int  # slots the node declares


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reused = os.environ.get("MASKSWEEP_TEST_SLURM_DIR")
    if reused:
        root = Path(reused)
        if not (root / "etc" / "slurm.conf").is_file():
            pytest.fail(f"MASKSWEEP_TEST_SLURM_DIR={reused}: no cluster (scripts/slurm-cluster start it)")
    else:
        missing = [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]
        if missing:
            pytest.skip(f"{NOT_INSTALLED} (missing: {', '.join(missing)})")
        # Not pytest's tmp_path: its base is mode 0700, and munged needs o+x on every directory above its
        # socket.
        root = Path(tempfile.mkdtemp(prefix="masksweep-slurm-", dir="/tmp"))
        start = subprocess.run([str(SCRIPT), "start", str(root)], capture_output=True, text=True, timeout=180)
        if start.returncode != 0:
            pytest.fail(f"the SLURM fixture did not start (files kept in {root}): {start.stderr.strip()}")
    conf = root / "etc" / "slurm.conf"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        cpus = int(_slurm("sinfo", "-h", "-o", "%c").split()[0])
        yield SlurmCluster(dir=root, conf=conf, cpus=cpus)
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not reused:
            subprocess.run([str(SCRIPT), "stop", str(root)], capture_output=True, timeout=120)
            shutil.rmtree(root, ignore_errors=True)


def squeue_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Job id -> state (PENDING, RUNNING, COMPLETED, ...) as squeue sees it, finished jobs included."""
    ids = ",".join(job_ids)
    out = _slurm("squeue", "-h", "--states=all", "-j", ids, "-o", "%i %T") if ids else ""
    return dict(line.split() for line in out.splitlines())


def sacct_state(job_id: str) -> str | None:
    """The accounting state of a job's latest run (COMPLETED, CANCELLED, ...), None before it is recorded."""
    lines = _slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").splitlines()
    # "CANCELLED by 0" reads as CANCELLED; after a requeue the last line is the current run.
    return lines[-1].split()[0] if lines else None


def wait_for(pred: Callable[[], T], timeout: float, what: str = "the condition", interval: float = 0.2) -> T:
    """Poll `pred` until it returns something truthy, and return that; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


# sacct states after which a job never runs again (PREEMPTED and REQUEUED are left out: a requeue follows).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_ended(job_id: str, timeout: float) -> str:
    """Wait for a job's end in accounting and return its final state."""
    return wait_for(lambda: (state := sacct_state(job_id)) in ENDED and state, timeout, f"job {job_id}'s end")


def scancel(job_id: str) -> None:
    _slurm("scancel", job_id)


def requeue(job_id: str) -> None:
    """`scontrol requeue`: the job goes back to PENDING and runs again after AuthInfo's cred_expire (10 s)."""
    _slurm("scontrol", "requeue", job_id)
