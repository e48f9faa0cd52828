"""Worker heartbeat, stale-trial detection and retry.

A trial whose sweeper process was killed (kill -9, OOM killer, a preempted node) stays RUNNING in the storage
forever. It must be detected, failed and re-run, or the study never reaches n_trials and a resumed sweep waits
on it.

- RDB storages: Optuna's own mechanism. RDBStorage(heartbeat_interval, grace_period,
  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback) stores beats in its heartbeat table and
  `optuna.storages.fail_stale_trials` fails and re-enqueues stale trials. Optuna only runs the beat thread
  inside Study.optimize(); with ask/tell the sweeper calls `record_heartbeat` itself.
- Journal storages: Optuna's JournalStorage has no heartbeat support (it does not implement BaseHeartbeat), so
  this part is written by hand: while a trial runs, a daemon thread of the sweeper process writes the current
  unix time to the trial's system attr `masksweep:heartbeat` every heartbeat_interval seconds. Any worker
  (or a restart) that finds a RUNNING trial whose beat is older than grace_period fails it and re-enqueues
  its params as a WAITING trial, recording the retried trial number as Optuna's
  RetryHeartbeatStaleTrialCallback does (system attrs `failed_trial` and `retry_history`).
- Both: each trial also records which process runs it (host, boot id, pid namespace, pid). When that process
  is on this machine and is gone, the trial is stale at once, so a restarted sweep does not wait out the grace
  period. The shortcut is only taken when all of host, boot id and pid namespace match (containers sharing a
  hostname have different pid namespaces), otherwise the time-based rule applies.

Beats are wall-clock times written by each worker: workers on several machines sharing a journal (NFS) need
synchronised clocks (NTP), with skews well below grace_period.

The beat comes from the sweeper process, not from the job: it says "the worker that owns this trial is
alive", which stays true while a job runs in a launcher's child process. A hung job is not stale.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from masksweep.study import storage as B

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

# Attrs that describe one run of a trial; a retry starts without them.
_RUN_SYSTEM_ATTRS = (B.WORKER_ATTR, B.HEARTBEAT_ATTR, B.STALE_ATTR)
_RUN_USER_ATTRS = ("error",)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class WorkerIdentity:
    host: str
    pid: int
    boot: str | None
    pidns: str | None
    id: str

    @classmethod
    def current(cls) -> WorkerIdentity:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            boot=_read("/proc/sys/kernel/random/boot_id"),
            pidns=_pid_namespace(),
            id=uuid.uuid4().hex,
        )

    def as_attr(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "boot": self.boot, "pidns": self.pidns, "id": self.id}

    def owns(self, attr: Any) -> bool:
        return isinstance(attr, dict) and attr.get("id") == self.id

    def local_owner_is_dead(self, attr: Any) -> bool:
        """True only when the owner ran on this very machine and pid namespace, and its pid is gone."""
        if not isinstance(attr, dict) or self.boot is None or self.pidns is None:
            return False
        same_place = (attr.get("host"), attr.get("boot"), attr.get("pidns")) == (
            self.host,
            self.boot,
            self.pidns,
        )
        if not same_place or not isinstance(attr.get("pid"), int):
            return False
        return not pid_alive(int(attr["pid"]))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class HeartbeatThread:
    """Beats for the trials this worker runs (a batch of n_jobs at a time) and, through `on_beat`, for the
    worker itself. One thread per sweeper process."""

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        kind: B.StorageKind,
        interval: float,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self._storage = storage
        self._kind = kind
        self._interval = max(0.05, float(interval))
        self._trial_ids: set[int] = set()
        self._on_beat = on_beat
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="masksweep-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def track(self, trial_id: int) -> None:
        with self._guard:
            self._trial_ids.add(trial_id)
        self.beat(trial_id)

    def untrack(self, trial_id: int | None = None) -> None:
        """Stop beating for `trial_id`, or for every trial."""
        with self._guard:
            if trial_id is None:
                self._trial_ids.clear()
            else:
                self._trial_ids.discard(trial_id)

    def beat(self, trial_id: int) -> None:
        try:
            if self._kind == "rdb":
                record = getattr(self._storage, "record_heartbeat", None)
                enabled = getattr(self._storage, "get_heartbeat_interval", lambda: None)() is not None
                if record is not None and enabled:
                    record(trial_id)
            else:
                self._storage.set_trial_system_attr(trial_id, B.HEARTBEAT_ATTR, time.time())
        except Exception as err:  # the trial may have just finished, or the database blinked: beat later
            log.debug("heartbeat for trial id %s skipped: %s", trial_id, err)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._guard:
                trial_ids = sorted(self._trial_ids)
            for trial_id in trial_ids:
                self.beat(trial_id)
            if self._on_beat is not None:
                try:
                    self._on_beat()
                except Exception as err:
                    log.debug("worker heartbeat skipped: %s", err)


def reap_stale_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    kind: B.StorageKind,
    me: WorkerIdentity,
    grace_period: float,
    max_retry: int | None,
    now: float | None = None,
    adopt: Callable[[FrozenTrial, str], bool] | None = None,
) -> list[int]:
    """Fail the study's stale RUNNING trials and re-enqueue them; return the numbers of those failed here.
    `adopt(trial, why_stale)` may take a stale trial over instead (its scheduler job still runs): True skips
    it.

    Callers hold the study's ask lock, so two workers never retry the same trial twice; without a lock the
    storage still refuses the second FAIL (UpdateFinishedTrialError) and only its winner re-enqueues.
    """
    import optuna
    from optuna.trial import TrialState

    reaped: list[int] = []
    clock = time.time() if now is None else now
    study_id = storage.get_study_id_from_name(study.study_name)
    rdb_stale = set(_rdb_stale_trial_ids(storage, study_id)) if kind == "rdb" else set()
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(B.WORKER_ATTR)
        if me.owns(owner):
            continue
        reason: str | None = None
        if me.local_owner_is_dead(owner):
            reason = f"its worker process {owner['host']}:{owner['pid']} is gone"
        elif kind == "journal":
            last = trial.system_attrs.get(B.HEARTBEAT_ATTR)
            if not isinstance(last, (int, float)):
                last = trial.datetime_start.timestamp() if trial.datetime_start else None
            if last is not None and clock - float(last) > grace_period:
                where = f"{owner['host']}:{owner['pid']}" if isinstance(owner, dict) else "unknown worker"
                age = clock - float(last)
                reason = f"no heartbeat from {where} for {age:.0f}s (grace period {grace_period:g}s)"
        elif trial._trial_id in rdb_stale:
            reason = f"no heartbeat for over {grace_period:g}s"
        if reason is None:
            continue
        if adopt is not None and adopt(trial, reason):
            continue
        if fail_and_retry(study, storage, trial, f"stale: {reason}", max_retry):
            reaped.append(trial.number)
    if kind == "rdb":
        # After the pass above, so a trial whose local worker is known dead gets that reason, not a timeout.
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # runs the storage's retry callback
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reaped.extend(sorted(before - after - _finished_by_owner(study, before - after)))
    return reaped


def _rdb_stale_trial_ids(storage: optuna.storages.BaseStorage, study_id: int) -> list[int]:
    """The trial ids Optuna's RDB heartbeat takes for stale (the ones fail_stale_trials would fail), so an
    adoptable one can be taken over first; Optuna has no public query for them."""
    getter = getattr(storage, "_get_stale_trial_ids", None)
    enabled = getattr(storage, "get_heartbeat_interval", lambda: None)() is not None
    return list(getter(study_id)) if getter is not None and enabled else []


def _finished_by_owner(study: optuna.Study, numbers: set[int]) -> set[int]:
    """Of the trials that left RUNNING during fail_stale_trials, those that finished normally meanwhile."""
    from optuna.trial import TrialState

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return {n for n in numbers if n in by_number and by_number[n].state != TrialState.FAIL}


def fail_and_retry(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    trial: FrozenTrial,
    reason: str,
    max_retry: int | None,
) -> bool:
    """FAIL a RUNNING trial with `reason` and enqueue a retry with its params; False if it finished."""
    import optuna
    from optuna.trial import TrialState

    trial_id = trial._trial_id
    try:
        # Attrs first: a finished trial can no longer be written to.
        storage.set_trial_system_attr(trial_id, B.STALE_ATTR, reason)
        storage.set_trial_user_attr(trial_id, "error", reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError) as err:
        log.debug("trial %d finished before it could be failed as stale: %s", trial.number, err)
        return False
    log.warning("trial %d failed (%s)", trial.number, reason)
    failed = storage.get_trial(trial_id)
    retry_trial(study, failed, max_retry)
    return True


def retry_trial(study: optuna.Study, failed: FrozenTrial, max_retry: int | None) -> bool:
    """Enqueue `failed` again as a WAITING trial with the same params, like RetryHeartbeatStaleTrialCallback,
    minus the attrs of the failed run (owner, heartbeat, error)."""
    import optuna

    history = [*failed.system_attrs.get(B.RETRY_HISTORY_ATTR, []), failed.number]
    if max_retry is not None and len(history) > max_retry:
        log.warning(
            "trial %d is not retried: it already ran %d times (max_retry=%d)",
            failed.number,
            len(history),
            max_retry,
        )
        return False
    system_attrs = {k: v for k, v in copy.deepcopy(failed.system_attrs).items() if k not in _RUN_SYSTEM_ATTRS}
    system_attrs[B.RETRY_FROM_ATTR] = history[0]
    system_attrs[B.RETRY_HISTORY_ATTR] = history
    user_attrs = {k: v for k, v in copy.deepcopy(failed.user_attrs).items() if k not in _RUN_USER_ATTRS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.WAITING,
                    params=failed.params,
                    distributions=failed.distributions,
                    user_attrs=user_attrs,
                    system_attrs=system_attrs,
                )
            )
    except Exception as err:
        log.error("trial %d could not be re-enqueued: %s", failed.number, err)
        return False
    log.info("trial %d re-enqueued with the same params (retry %d)", failed.number, len(history))
    return True


def superseded_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Trials that failed and were retried: their retry stands in for them in the budget and the counts."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get(B.RETRY_HISTORY_ATTR, []) or [])
    return out
