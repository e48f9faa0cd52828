"""Starting one trial's job and noticing when it ends, whatever the Hydra launcher.

The sweeper keeps n_jobs trials in flight and starts the next one the moment any ends, so it needs one job per
launch and a way to poll it. Hydra's `Launcher.launch()` takes a batch and blocks until the whole batch is
done, which is what leaves slots idle (hydra#2257, #2435), so:

- submitit (`submitit_slurm`, `submitit_local`): the launcher's own callable is submitted through submitit's
  API (the same executor settings `launch()` builds), one job per trial. The job handle is polled here and
  recorded in the trial, so a job outlives a dead sweeper and the next one adopts it (masksweep.study.jobs).
  submitit's time-limit requeue still works: the callable is the launcher, with its `checkpoint()`.
- any other process launcher (joblib, ...): one `launch([job])` call per trial on a daemon thread.
- the basic launcher runs the job in this very process, so one trial at a time, in the main thread (signals
  reach the trial there).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from masksweep.study import jobs

from ._settings import SweepError

if TYPE_CHECKING:
    import submitit
    from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)

Result = JobReturn | BaseException  # a job's JobReturn, or why it has none (cancelled, killed, crashed)


class Handle(Protocol):
    detached: bool  # the job outlives this process (a later sweeper can adopt it)
    log_file: str | None

    def poll(self, force: bool) -> Result | None:
        """The job's result once it has ended, else None. `force`: ask the scheduler now, not from a cache."""
        ...


class SubmititHandle:
    def __init__(self, job: submitit.Job, record: dict[str, Any]) -> None:
        self.job, self.record = job, record
        self.detached = True
        self.log_file: str | None = record.get("stderr")

    def poll(self, force: bool) -> Result | None:
        if self.record["kind"] == "local" and getattr(self.job, "_process", None) is None:
            # An adopted local job: submitit only knows the processes it started itself.
            done = not jobs.local_pid_alive(self.record)
        else:
            done = self.job.done(force_check=force)
        if not done:
            return None
        # Rank 0's return: in a multi-task (DDP) job it carries the trial's outcome, while a rank killed on
        # its own (OOM) would make results() raise for the whole job.
        job = self.job.task(0) if self.job.num_tasks > 1 else self.job
        try:
            return job.result()
        except Exception as exc:  # UncompletedJobError (cancelled, killed, no output), FailedJobError
            return exc


class ThreadHandle:
    """`launcher.launch([job])` on a daemon thread: a sweeper stopped by Ctrl-C must not wait for it."""

    detached = False
    log_file = None

    def __init__(
        self, launcher: Launcher, overrides: Sequence[str], number: int, wake: threading.Event
    ) -> None:
        self._result: Result | None = None

        def run() -> None:
            try:
                self._result = launcher.launch([list(overrides)], initial_job_idx=number)[0]
            except BaseException as exc:
                self._result = exc
            finally:
                wake.set()

        self._thread = threading.Thread(target=run, name=f"masksweep-trial-{number}", daemon=True)
        self._thread.start()

    def poll(self, force: bool) -> Result | None:
        return None if self._thread.is_alive() else self._result


class Launch:
    """How this sweeper starts jobs: `start()` returns a Handle, or the JobReturn itself for the basic
    launcher (the job has run by then)."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.wake = threading.Event()  # set when a threaded job ends, so the loop need not wait out a poll
        self.kind = _submitit_kind(launcher)
        self.inline = type(launcher).__name__ == "BasicLauncher"
        self._executor: submitit.Executor | None = None

    def check(self) -> None:
        """What would make every job fail or hang, said before the first one is submitted."""
        if self.kind == "slurm":
            check_slurm(self.launcher.params)

    def start(self, overrides: Sequence[str], number: int) -> Handle | JobReturn:
        if self.inline:
            return self.launcher.launch([list(overrides)], initial_job_idx=number)[0]
        if self.kind is None:
            return ThreadHandle(self.launcher, overrides, number, self.wake)
        try:
            job = self._submitit().submit(
                self.launcher,
                list(overrides),
                "hydra.sweep.dir",
                number,
                f"job_id_for_{number}",
                Singleton.get_state(),
            )
        except Exception as exc:
            raise SweepError(f"{self.kind} rejected the job of trial {number}: {_first_line(exc)}") from exc
        return SubmititHandle(job, jobs.record(job, self.kind))

    def _submitit(self) -> submitit.Executor:
        """The executor `BaseSubmititLauncher.launch()` builds, built once: same folder, same parameters."""
        if self._executor is None:
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            params = dict(self.launcher.params)
            init = {"folder": params.pop("submitit_folder")}
            if "max_num_timeout" in params:
                init[f"{self.kind}_max_num_timeout"] = params.pop("max_num_timeout")
            executor = submitit.AutoExecutor(cluster=self.kind, **init)
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{k if k in shared else f"{self.kind}_{k}": v for k, v in params.items()}
            )
            self._executor = executor
        return self._executor


def adopt(record: dict[str, Any]) -> SubmititHandle:
    return SubmititHandle(jobs.rebuild(record), record)


def _submitit_kind(launcher: Launcher) -> jobs.JobKind | None:
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
    except ImportError:
        return None
    if not isinstance(launcher, BaseSubmititLauncher):
        return None
    return "slurm" if launcher._EXECUTOR == "slurm" else "local"


def check_slurm(params: dict[str, Any]) -> None:
    """SLURM's commands are here, accounting answers (without it submitit never learns that a cancelled job
    died, and the sweep waits for ever), and the partition exists."""
    for command in ("sbatch", "sacct", "scontrol"):
        if shutil.which(command) is None:
            raise SweepError(
                f"hydra/launcher=submitit_slurm needs SLURM's `{command}` on PATH; run the sweep on a login "
                "node of the cluster, or use hydra/launcher=submitit_local"
            )
    answer = _run(["sacct", "--noheader", "--allocations", "--starttime", "now", "--format", "JobID"])
    if answer.returncode != 0:
        raise SweepError(
            f"SLURM accounting does not answer (sacct: {_first_line(answer.stderr or answer.stdout)}); the "
            "sweep needs it to see cancelled and failed jobs end: ask for AccountingStorageType="
            "accounting_storage/slurmdbd, or use hydra/launcher=submitit_local"
        )
    partition = params.get("partition")
    if partition:
        answer = _run(["scontrol", "show", "partition", str(partition)])
        if answer.returncode != 0:
            known = _run(["sinfo", "--noheader", "--format", "%R"]).stdout.split()
            raise SweepError(
                f"hydra.launcher.partition={partition} is not a partition of this cluster; allowed: "
                f"{', '.join(sorted(set(known))) or 'see sinfo'}"
            )


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 1, "", str(exc))


def _first_line(text: Any) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    # sbatch's own complaint is its last line ("sbatch: error: invalid partition specified: gpu")
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(text).__name__])[-1 if errors else 0]
