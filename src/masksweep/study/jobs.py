"""Trials that run as scheduler jobs (submitit: SLURM, or local processes) belong to the study, not to the
sweeper process that submitted them.

The sweeper records each job in its trial (system attr `masksweep:job`) the moment it is submitted. A sweeper
that dies (kill -9, a lost login node) leaves its jobs running or queued; the next sweeper on the study finds
their trials stale, sees that their jobs are alive, and adopts them (waits for them and collects their
results through submitit) instead of training the same params a second time. A job that is gone is retried
from its last checkpoint like any dead trial.

The job side (`job_tags`) reads where it runs from the scheduler's environment, for the MLflow run's tags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import submitit

JobKind = Literal["slurm", "local"]


def record(job: submitit.Job, kind: JobKind) -> dict[str, Any]:
    """What a later sweeper needs to find the job again: its id, its submitit folder and logs, and for local
    jobs the machine they run on (a local job id is a pid)."""
    from masksweep.study.heartbeat import WorkerIdentity

    here = WorkerIdentity.current()
    return {
        "kind": kind,
        "job_id": str(job.job_id),
        "folder": str(Path(job.paths.folder).absolute()),
        "stdout": str(Path(job.paths.stdout).absolute()),
        "stderr": str(Path(job.paths.stderr).absolute()),
        "host": here.host,
        "boot": here.boot,
        "pidns": here.pidns,
    }


def rebuild(rec: dict[str, Any]) -> submitit.Job:
    """The submitit job handle of a recorded job, to poll it and read its result."""
    import submitit

    cls = submitit.SlurmJob if rec["kind"] == "slurm" else submitit.LocalJob
    return cls(folder=rec["folder"], job_id=rec["job_id"])


def alive(rec: Any) -> bool:
    """Whether the recorded job may still run (queued, running, requeued): False when it is known to be over.
    A local job on another machine cannot be seen from here: it counts as over (its trial's heartbeat rule
    applies, as for any worker there)."""
    if not isinstance(rec, dict) or rec.get("kind") not in ("slurm", "local"):
        return False
    if rec["kind"] == "slurm":
        return not rebuild(rec).done(force_check=True)
    return local_pid_alive(rec)


def collectable(rec: Any) -> bool:
    """The job still runs, or it ended and left its result (while no sweeper was there to read it)."""
    if not isinstance(rec, dict) or rec.get("kind") not in ("slurm", "local"):
        return False
    return alive(rec) or Path(rebuild(rec).paths.result_pickle).exists()


def local_pid_alive(rec: dict[str, Any]) -> bool:
    from masksweep.study.heartbeat import WorkerIdentity, pid_alive

    here = WorkerIdentity.current()
    if (rec.get("host"), rec.get("boot"), rec.get("pidns")) != (here.host, here.boot, here.pidns):
        return False
    return pid_alive(int(rec["job_id"]))


def job_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Where this process runs, as MLflow tags: the SLURM job id, array index, node and requeue count, and
    the submitit log file. Empty outside a scheduler job."""
    env = os.environ if environ is None else environ
    tags: dict[str, str] = {}
    if "SLURM_JOB_ID" in env:
        array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        tags["slurm.job_id"] = (
            f"{array_job}_{array_task}" if array_job and array_task else env["SLURM_JOB_ID"]
        )
        if array_task:
            tags["slurm.array_index"] = array_task
        tags["slurm.node"] = env.get("SLURMD_NODENAME") or env.get("SLURM_NODELIST", "")
        tags["slurm.restart_count"] = env.get("SLURM_RESTART_COUNT", "0")
    if "SUBMITIT_FOLDER" in env:
        try:
            import submitit

            paths = submitit.JobEnvironment().paths
            tags["masksweep.log_file"] = str(Path(paths.stdout).absolute())
        except Exception:  # not inside a submitit job after all (a stale variable): no log to name
            pass
    return tags
