"""The budget rule: `n_trials` is the study's total, whichever worker asks.

Under the study's ask lock, a worker:
  1. fails stale RUNNING trials (dead workers) and re-enqueues them as WAITING retries, unless their scheduler
     job still runs: then it adopts them (masksweep.study.jobs);
  2. counts the trials that use the budget: every trial of the study except stale ones that were retried
     (their retry stands in for them) and surplus ones (below);
  3. asks: Optuna's ask() first pops a WAITING trial (a retry, or one enqueued by hand), which is already
     counted; otherwise it creates a new trial only while the count is below n_trials. With sampler grid it
     also stops when every grid point has been handed out.
Because steps 2-3 run under one lock, two workers that both see n_trials - 1 trials cannot both create one,
and the study ends with exactly n_trials trials that are COMPLETE, PRUNED or FAIL. On databases without a lock
(anything but journal files, SQLite and PostgreSQL), a trial created past the budget by such a race is told
FAIL at once with the system attr `masksweep:surplus` and left out of every count.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from masksweep.study import storage as B
from masksweep.study.heartbeat import HeartbeatThread, WorkerIdentity, reap_stale_trials, superseded_numbers

from ._outcomes import ERROR_CHARS
from ._results import budget_used, count_trials
from ._samplers import suggest
from ._settings import FailureRateExceeded, Settings, SweepError
from ._space import SearchSpace

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

Adopt = Callable[["FrozenTrial", str], bool]


class Budget:
    def __init__(
        self,
        study: optuna.Study,
        lock: B.StudyLock,
        kind: B.StorageKind,
        settings: Settings,
        n_trials: int,
        space: SearchSpace,
        grid: dict[str, list[Any]] | None,
        me: WorkerIdentity,
        heartbeat: HeartbeatThread,
    ) -> None:
        self.study, self.storage, self.lock, self.kind = study, study._storage, lock, kind
        self.settings, self.n_trials, self.space, self.grid = settings, n_trials, space, grid
        self.me, self.heartbeat = me, heartbeat

    def claim(self, adopt: Adopt | None = None, room: Callable[[], int] = lambda: 1) -> optuna.Trial | None:
        """Under the ask lock: reap (or adopt) stale trials, then ask one trial within the budget while the
        caller has `room()` for it (adopted trials take slots too)."""
        with self.lock.hold():
            reap_stale_trials(
                self.study,
                self.storage,
                self.kind,
                self.me,
                float(self.settings.grace_period or 0),
                self.settings.max_retry,
                adopt=adopt,
            )
            self.check_failure_rate()
            return self._ask() if room() > 0 else None

    def done(self, trials: list[FrozenTrial] | None = None) -> bool:
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        c = count_trials(trials)
        return c.running == 0 and c.waiting == 0 and budget_used(trials) >= self.n_trials

    def check_failure_rate(self, trials: list[FrozenTrial] | None = None) -> None:
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        failed = count_trials(trials).failed
        limit = float(self.settings.max_failure_rate) * self.n_trials
        if failed > limit:
            superseded = superseded_numbers(trials)
            errors = [t for t in trials if t.state == TrialState.FAIL and t.number not in superseded]
            last = errors[-1].user_attrs.get("error", "no error recorded") if errors else ""
            raise FailureRateExceeded(
                f"sweep stopped: {failed} of the study's n_trials={self.n_trials} trials failed, more than "
                f"max_failure_rate={self.settings.max_failure_rate} allows ({limit:g}); last error: {last}. "
                "Fix the cause and run the same command again to resume the study."
            )

    def _ask(self) -> optuna.Trial | None:
        """Apply the budget rule, ask and suggest every param (the caller holds the ask lock)."""
        study = self.study
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and (budget_used(trials) >= self.n_trials or self._grid_left(trials) == 0):
            return None
        with warnings.catch_warnings():
            # RDB heartbeats are meant for Study.optimize(); here the sweeper beats itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        self.storage.set_trial_system_attr(trial._trial_id, B.WORKER_ATTR, self.me.as_attr())
        self.heartbeat.track(trial._trial_id)
        try:
            for name, dist in self.space.distributions.items():
                suggest(trial, name, dist)
        except Exception as err:
            self.heartbeat.untrack(trial._trial_id)
            msg = f"could not suggest params for trial {trial.number}: {err}"
            trial.set_user_attr("error", msg[:ERROR_CHARS])
            study.tell(trial, state=TrialState.FAIL)
            raise SweepError(f"{msg} (did the search space change since the study started?)") from err
        if not self.lock.exact and self._is_surplus(trial):
            self.heartbeat.untrack(trial._trial_id)
            return None
        return trial

    def _grid_left(self, trials: list[FrozenTrial]) -> int | None:
        """Grid points not yet handed to any trial; None when the sampler is not grid."""
        if self.grid is None:
            return None
        ours = {k: list(v) for k, v in sorted(self.grid.items())}
        taken = {
            t.system_attrs["grid_id"]
            for t in trials
            if "grid_id" in t.system_attrs and t.system_attrs.get("search_space") == ours
        }
        return math.prod(len(v) for v in ours.values()) - len(taken)

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        frozen = self.storage.get_trial(trial._trial_id)
        if B.RETRY_FROM_ATTR in frozen.system_attrs or "fixed_params" in frozen.system_attrs:
            return False  # popped from the queue: counted already
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
        if budget_used(trials) < self.n_trials:
            return False
        self.storage.set_trial_system_attr(trial._trial_id, B.SURPLUS_ATTR, True)
        self.study.tell(trial, state=TrialState.FAIL)
        log.info("trial %d was asked past the budget by a concurrent worker; dropped (surplus)", trial.number)
        return True
