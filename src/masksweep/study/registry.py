"""Study-wide records kept in the Optuna study itself: its MLflow parent run, its live workers, its summary.

Optuna's storage is the one place every worker of a study already shares (a journal file, PostgreSQL), so it
is the registry: no "start the workers apart" rule, and it works the same with the embedded MLflow store and
with a tracking server. A record is a study system attr, written once with a compare-and-set: under the
study's ask lock (flock / PostgreSQL advisory lock, see storage.StudyLock) read it, create it if absent. On
storages without a lock the set is followed by a read-back, and the value the storage holds wins (the loser
undoes what it made), so every worker still agrees on one value.

Workers are tracked like trials (heartbeat.py): each sweeper process writes {identity, beat, done} to its own
attr and beats it while it runs. A worker is live while it is not done, its process exists (same machine) and
its beat is younger than the grace period: a parent run whose workers are all dead is stale, and the next
worker adopts it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from masksweep.study import storage as S

if TYPE_CHECKING:
    import optuna

    from masksweep.study.heartbeat import WorkerIdentity

PARENT_ATTR_PREFIX = "masksweep:mlflow_parent:"  # + hash of the tracking store: {"run_id", ...}
WORKER_ATTR_PREFIX = "masksweep:worker:"  # + worker id: {"host", "pid", ..., "beat", "done"}
SUMMARY_ATTR = "masksweep:summary"  # {"finished": n, "by": worker id, "dir": path}: who wrote the summary


def parent_key(tracking_uri: str, experiment: str) -> str:
    """One parent per study and tracking store: a rerun against another store makes its own there."""
    digest = hashlib.sha256(f"{tracking_uri}\0{experiment}".encode()).hexdigest()[:12]
    return PARENT_ATTR_PREFIX + digest


class StudyRegistry:
    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, lock: S.StudyLock) -> None:
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study_name)
        self.lock = lock

    def get(self, key: str) -> Any:
        return self.storage.get_study_system_attrs(self.study_id).get(key)

    def set(self, key: str, value: Any) -> None:
        self.storage.set_study_system_attr(self.study_id, key, value)

    def claim(
        self, key: str, make: Callable[[], Any], undo: Callable[[Any], None] | None = None,
        replace: Callable[[Any], bool] | None = None,
    ) -> tuple[Any, bool]:
        """The record at `key`: the one already there (unless `replace(it)` says it is unusable), else
        `make()`'s. Returns (record, made_here)."""
        with self.lock.hold():
            current = self.get(key)
            if current is not None and not (replace is not None and replace(current)):
                return current, False
            mine = make()
            self.set(key, mine)
        if self.lock.exact:
            return mine, True
        winner = self.get(key)  # no lock: the storage's last write is what every worker reads
        if winner != mine and undo is not None:
            undo(mine)
        return winner, winner == mine

    # ------------------------------------------------------------------ workers
    def join(self, me: WorkerIdentity) -> None:
        self.beat(me)

    def beat(self, me: WorkerIdentity, done: bool = False) -> None:
        self.set(WORKER_ATTR_PREFIX + me.id, {**me.as_attr(), "beat": time.time(), "done": done})

    def leave(self, me: WorkerIdentity) -> None:
        self.beat(me, done=True)

    def live_workers(self, me: WorkerIdentity, grace_period: float, now: float | None = None) -> list[dict]:
        """The study's other workers that may still be running (not done, not known dead, beating)."""
        clock = time.time() if now is None else now
        out = []
        for key, record in self.storage.get_study_system_attrs(self.study_id).items():
            if not key.startswith(WORKER_ATTR_PREFIX) or not isinstance(record, dict):
                continue
            if me.owns(record) or record.get("done") or me.local_owner_is_dead(record):
                continue
            if clock - float(record.get("beat") or 0) > grace_period:
                continue
            out.append(record)
        return out


__all__ = ["PARENT_ATTR_PREFIX", "SUMMARY_ATTR", "WORKER_ATTR_PREFIX", "StudyRegistry", "parent_key"]
