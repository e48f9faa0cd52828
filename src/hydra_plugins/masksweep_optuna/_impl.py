"""The sweep: keep `n_jobs` trials in flight, start the next the moment one ends, tell Optuna how each ended.

Each worker asks Optuna for a trial whenever one of its `hydra.sweeper.n_jobs` slots is free (with the latest
study state: TPE sees every finished result), launches it as one job (_launch.py) and, when the job ends,
tells Optuna COMPLETE, PRUNED (pruned or diverged) or FAIL (_outcomes.py). The budget rule is in _budget.py,
the study's end in _end.py. Running the same sweep command several times (one process per GPU, or on several
machines with a PostgreSQL storage) adds workers to the same study. Everything study-wide (its MLflow parent
run, its live workers, its one summary) is kept in the study itself (masksweep.study.registry).

A trial whose job ends without a result (cancelled, killed, its node failed, out of requeues) fails alone and
is retried from its last checkpoint; its slot is refilled and the sweep goes on. Scheduler jobs (submitit)
belong to the study: when this process stops, they keep running, and the next worker adopts them.
A worker with nothing left to ask waits while other workers still run trials (wait_for_running), so it can
retry one whose worker dies, then writes the final results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from masksweep.errors import MasksweepError
from masksweep.interrupts import signals_raise
from masksweep.study import carry_intermediate_values, jobs
from masksweep.study import storage as B
from masksweep.study.compute import SlotClock
from masksweep.study.heartbeat import HeartbeatThread, WorkerIdentity, fail_and_retry
from masksweep.study.registry import StudyRegistry
from masksweep.tracking.parent import StudyParent
from masksweep.tracking.store import first_line

from ._budget import Budget
from ._end import TRIAL_NAME_ATTR, StudyEnd
from ._launch import Handle, Launch, Result, adopt
from ._outcomes import Outcome, classify, lost_job, with_log
from ._results import count_trials, trial_label
from ._samplers import default_study_name, sweep_name
from ._settings import Settings, SweepError, SweepInterrupted
from ._setup import check_space, exclude_identity_from_override_dirname, open_study
from ._space import quote

if TYPE_CHECKING:
    from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)

# The job-config keys that carry the trial's identity (conf/train.yaml's `optuna:` block).
IDENTITY_KEYS = ("optuna.storage", "optuna.study_name", "optuna.trial_number")
STUDY_DIR_ATTR = "masksweep:sweep_dir"  # study: the first worker's sweep dir, where the one summary goes
ASK_AGAIN_S = 5.0  # with the budget spent: how often to look for retries (stale or dead trials) to take on
POLL_S = 0.1  # how often in-flight jobs are looked at: a stat of their result files (the scheduler is asked
# every hydra.sweeper.slurm_poll_interval seconds)


@dataclass
class InFlight:
    trial: optuna.Trial
    handle: Handle
    started: float


class MasksweepOptunaSweeperImpl:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None
        self.me = WorkerIdentity.current()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        exclude_identity_from_override_dirname(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        s = self.settings
        checked = check_space(s, arguments, self.hydra_context, self.config)
        space = self.space = checked.space
        self.launch = Launch(self.launcher)
        self.launch.check()
        slots = int(s.n_jobs or 1)
        if self.launch.inline and slots > 1:
            log.warning("hydra.sweeper.n_jobs=%d: the basic launcher runs one trial at a time", slots)
            slots = 1
        study_name = s.study_name or default_study_name(sweep_name(self.config), space, s.direction)
        try:
            self.spec = B.parse_storage(s.storage, study_name)
        except B.StorageSpecError as err:
            raise SweepError(str(err)) from err
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        opened = open_study(s, self.spec, space, study_name)
        study = self.study = opened.study
        self.storage, self.lock = opened.storage, opened.lock
        self.registry = StudyRegistry(self.storage, study_name, self.lock)
        log.info(
            "study %s: %d trials so far, budget n_trials=%d, sampler %s, pruner %s, worker %d, n_jobs %d",
            study_name,
            opened.existing,
            checked.n_trials,
            checked.sampler_name,
            B.pruner_spec(s.pruner)["name"],
            opened.worker_index,
            slots,
        )
        log.info("  open it: %s", self.spec.dashboard_hint(study_name))
        for name, dist in space.distributions.items():
            log.info("  %s: %r", name, dist)

        grace = float(s.grace_period or 0)
        self._launched = False
        self.slots = slots
        self.clock = SlotClock(slots)
        self.running: dict[int, InFlight] = {}
        self._ask_after = 0.0
        self.results: list[JobReturn] = []
        others_live = bool(self.registry.live_workers(self.me, grace))
        self.registry.join(self.me)
        self.heartbeat = HeartbeatThread(
            self.storage, self.spec.kind, s.heartbeat_interval, on_beat=lambda: self.registry.beat(self.me)
        )
        self.heartbeat.start()
        self.budget = Budget(
            study,
            self.lock,
            self.spec.kind,
            s,
            checked.n_trials,
            space,
            checked.grid,
            self.me,
            self.heartbeat,
        )
        end: StudyEnd | None = None
        error: BaseException | None = None
        try:
            # `kill <sweeper>` stops the sweep as Ctrl-C does (in-process trials FAIL and are queued again)
            # instead of ending the process where it stands, with the parent run and the trials left RUNNING.
            with signals_raise():
                study_dir, _ = self.registry.claim(STUDY_DIR_ATTR, lambda: str(self.sweep_dir.absolute()))
                parent = None
                if s.study_parent_run:
                    parent = StudyParent.open(
                        self.config,
                        self.registry,
                        study_name,
                        self.spec.describe(),
                        self.sweep_dir,
                        others_live,
                    )
                end = StudyEnd(
                    study,
                    self.budget,
                    self.registry,
                    self.me,
                    parent,
                    Path(study_dir) if Path(study_dir).is_dir() else self.sweep_dir,
                    self.spec.describe(),
                    grace,
                    s.direction,
                    self.hydra_context,
                    self.config,
                    space,
                )
                self._loop()
        except BaseException as err:
            error = err
            self._abandon(err)
            raise
        finally:
            self.heartbeat.stop()
            try:
                if end is not None:
                    end.leave(error, self._launched, self.clock)
            finally:
                self.lock.close()
        return [self.results]

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        told_waiting = False
        last_force = 0.0
        while True:
            now = time.monotonic()
            force = now - last_force >= float(self.settings.slurm_poll_interval)
            if force:
                last_force = now
            self._collect(force)
            started = self._fill()
            if self.running:
                told_waiting = False
                if not started:
                    self.launch.wake.wait(POLL_S)
                    self.launch.wake.clear()
                continue
            if started:
                continue
            # Nothing in flight here and nothing to ask. Only trials run by masksweep workers beat, so a dead
            # worker's trial is found and retried (or adopted) by the next _fill.
            running = [
                t
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if B.WORKER_ATTR in t.system_attrs
            ]
            if not running or not self.settings.wait_for_running:
                if running:
                    log.info("budget spent; %d trials still run on other workers", len(running))
                return
            if not told_waiting:
                log.info(
                    "budget spent; waiting for %d trials on other workers (%s) to finish",
                    len(running),
                    ", ".join(str(t.number) for t in running),
                )
                told_waiting = True
            time.sleep(float(min(self.settings.heartbeat_interval, 10)))

    def _fill(self) -> bool:
        """Ask and start trials while a slot is free; True if any started. When the budget is spent, asking
        again (the study lock, a pass over its trials) waits until a trial ends or ASK_AGAIN_S pass."""
        started = False
        while len(self.running) < self.slots and time.monotonic() >= self._ask_after:
            trial = self.budget.claim(adopt=self._adopt, room=lambda: self.slots - len(self.running))
            if trial is None:
                self._ask_after = time.monotonic() + ASK_AGAIN_S
                break
            started = True
            self._start(trial)
        return started

    def _start(self, trial: optuna.Trial) -> None:
        assert self.hydra_context is not None and self.config is not None
        overrides = self._job_overrides(trial)
        try:
            # Compose first, so a bad param value fails this trial instead of the whole sweep.
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        except Exception as err:
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
            ret._return_value = err
            self._finish(InFlight(trial, _Done(), time.time()), ret)
            return
        name = OmegaConf.select(job_cfg, "trial_name", default=None)
        if name:
            trial.set_user_attr(TRIAL_NAME_ATTR, str(name))
        retry_of = self.storage.get_trial(trial._trial_id).system_attrs.get(B.RETRY_FROM_ATTR)
        log.info(
            "%s%s: %s",
            trial_label(trial.number, name),
            f" (retry of #{retry_of})" if retry_of is not None else "",
            " ".join(self.space.job_overrides(trial.params)),
        )
        self._launched = True
        flight = InFlight(trial, _Done(), time.time())
        self.running[trial.number] = flight
        handle = self.launch.start(overrides, trial.number)
        if isinstance(handle, JobReturn):  # the basic launcher ran it here and now
            self._finish(flight, handle)
            return
        flight.handle = handle
        record = getattr(handle, "record", None)
        if record is not None:
            self.storage.set_trial_system_attr(trial._trial_id, B.JOB_ATTR, record)
            log.info(
                "%s: %s job %s, log %s",
                trial_label(trial.number, name),
                record["kind"],
                record["job_id"],
                record["stderr"],
            )

    def _adopt(self, trial: Any, why: str) -> bool:
        """A stale trial whose scheduler job still runs: wait for that job instead of training it again."""
        record = trial.system_attrs.get(B.JOB_ATTR)
        if record is None or trial.number in self.running or not jobs.collectable(record):
            return False
        self.storage.set_trial_system_attr(trial._trial_id, B.WORKER_ATTR, self.me.as_attr())
        self.heartbeat.track(trial._trial_id)
        handle = adopt(record)
        self.running[trial.number] = InFlight(optuna.Trial(self.study, trial._trial_id), handle, time.time())
        log.info(
            "%s: adopted (%s); its %s job %s runs or left its result, log %s",
            trial_label(trial.number, trial.user_attrs.get(TRIAL_NAME_ATTR)),
            why,
            record["kind"],
            record["job_id"],
            handle.log_file,
        )
        return True

    def _collect(self, force: bool) -> None:
        for flight in list(self.running.values()):
            result = flight.handle.poll(force)
            if result is not None:
                self._finish(flight, result)

    def _finish(self, flight: InFlight, result: Result) -> None:
        trial = flight.trial
        self.running.pop(trial.number, None)
        self._ask_after = 0.0  # a slot is free, and a retry may be waiting
        self.heartbeat.untrack(trial._trial_id)
        self.clock.add(time.time() - flight.started)
        if isinstance(result, JobReturn):
            self.results.append(result)
            metric = OmegaConf.select(result.cfg, "optimized_metric") if result.cfg is not None else None
            outcome = classify(result, metric if isinstance(metric, str) else None)
        else:
            outcome = lost_job(result)
        outcome = with_log(outcome, flight.handle.log_file)
        self._tell(trial, outcome, result)
        self.budget.check_failure_rate()
        if outcome.retry and self.launch.inline:
            # The basic launcher ran the job in this process: the signal was meant for the sweep too.
            raise SweepInterrupted(f"sweep {outcome.message}; run the same command again to resume the study")

    def _abandon(self, err: BaseException) -> None:
        """The sweep stops with trials in flight: scheduler jobs run on (the next worker adopts them); trials
        run by this process FAIL and are queued again, so a resumed sweep re-runs them."""
        kept = []
        for flight in list(self.running.values()):
            self.heartbeat.untrack(flight.trial._trial_id)
            frozen = self.storage.get_trial(flight.trial._trial_id)
            if frozen.state != TrialState.RUNNING:
                continue
            if flight.handle.detached:
                kept.append(frozen.system_attrs.get(B.JOB_ATTR, {}).get("job_id", "?"))
                continue
            fail_and_retry(
                self.study,
                self.storage,
                frozen,
                f"interrupted: {type(err).__name__}: {first_line(err)}",
                self.settings.max_retry,
            )
        self.running.clear()
        if kept:
            log.warning(
                "the sweep stops; %d trial jobs run on (%s): the same command adopts them, or cancel them",
                len(kept),
                ", ".join(kept),
            )
        if isinstance(err, Exception) and not isinstance(err, MasksweepError):
            raise SweepError(
                f"the launcher failed: {type(err).__name__}: {first_line(err)}; its trials are queued again: "
                "run the same command to resume the study"
            ) from err

    def _tell(self, trial: optuna.Trial, outcome: Outcome, result: Result) -> None:
        label = trial_label(trial.number, trial.user_attrs.get(TRIAL_NAME_ATTR))
        if outcome.state == TrialState.FAIL and not outcome.retry:
            exc = getattr(result, "_return_value", None)
            log.error(
                "%s failed: %s",
                label,
                outcome.message,
                exc_info=exc if isinstance(exc, BaseException) else None,
            )
        # A retry resumed past epochs it did not report again: the dead attempts' values complete its curve.
        carry_intermediate_values(self.storage, self.study._study_id, trial._trial_id)
        try:
            for key, value in outcome.user_attrs.items():
                trial.set_user_attr(key, value)
            if outcome.retry:
                frozen = self.storage.get_trial(trial._trial_id)
                fail_and_retry(self.study, self.storage, frozen, outcome.message, self.settings.max_retry)
            elif outcome.state == TrialState.COMPLETE:
                self.study.tell(trial, outcome.value)
            else:
                self.study.tell(trial, state=outcome.state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as err:
            log.warning(
                "%s was finished elsewhere while it ran (taken for stale?): its result is dropped (%s)",
                label,
                err,
            )
            return
        self._log_progress(label, outcome)

    def _log_progress(self, label: str, outcome: Outcome) -> None:
        trials = self.study.get_trials(deepcopy=False)
        c = count_trials(trials)
        try:
            best = self.study.best_trial
            best_label = trial_label(best.number, best.user_attrs.get(TRIAL_NAME_ATTR))
            best_text = f"best {best.value:.6g} ({best_label})"
        except ValueError:
            best_text = "no best yet"
        what = f"{outcome.value:.6g}" if outcome.state == TrialState.COMPLETE else outcome.message
        log.info(
            "[%d/%d] %s %s %s | %s | %d complete, %d pruned, %d diverged, %d failed, %d retried",
            c.finished,
            self.budget.n_trials,
            label,
            outcome.state.name,
            what,
            best_text,
            c.complete,
            c.pruned,
            c.diverged,
            c.failed,
            c.retried,
        )

    def _job_overrides(self, trial: optuna.Trial) -> list[str]:
        identity = [
            f"++optuna.storage={quote(self.spec.url)}",
            f"++optuna.study_name={quote(self.study.study_name)}",
            f"++optuna.trial_number={trial.number}",
        ]
        # Trial numbers in flight need not be consecutive (a retry popped from the queue, another worker's
        # asks): keep each trial's own directory, named by its number.
        assert self.config is not None
        raw = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        keep_dir = [f"hydra.sweep.subdir={trial.number}"] if raw == "${hydra.job.num}" else []
        return [*self.space.job_overrides(trial.params), *keep_dir, *identity]

    # ------------------------------------------------------------------ set-up checks


class _Done:
    """The handle of a trial that is not (or no longer) running anywhere: it never ends by itself."""

    detached = False
    log_file = None

    def poll(self, force: bool) -> None:
        return None


__all__ = ["MasksweepOptunaSweeperImpl", "Settings", "SweepError", "SweepInterrupted", "classify"]
