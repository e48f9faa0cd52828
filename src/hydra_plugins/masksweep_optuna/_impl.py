"""The sweep: ask Optuna for trials, launch them through Hydra's launcher, tell Optuna how they ended.

Each round a worker asks `hydra.sweeper.n_jobs` trials (default 1) and launches them as one batch through the
configured launcher, as Hydra's Optuna sweeper does: joblib runs them as processes, submitit as SLURM jobs
(`submitit_local` is the same code path without a scheduler). Running the same sweep command several times
(one process per GPU, or on several machines with a PostgreSQL storage) adds workers to the same study.
Everything study-wide (its MLflow parent run, its live workers, its one summary) is kept in the study itself
(masksweep.study.registry), so workers never need to start apart.

Budget rule (`n_trials` is the study's total, not per process). Under the study's ask lock, a worker:
  1. fails stale RUNNING trials (dead workers) and re-enqueues them as WAITING retries;
  2. counts the trials that use the budget: every trial of the study except stale ones that were
     retried (their retry stands in for them) and surplus ones (below);
  3. asks: Optuna's ask() first pops a WAITING trial (a retry, or one enqueued by hand), which is already
     counted; otherwise it creates a new trial only while the count is below n_trials. With sampler grid it
     also stops when every grid point has been handed out.
Because steps 2-3 run under one lock, two workers that both see n_trials - 1 trials cannot both create one,
and the study ends with exactly n_trials trials that are COMPLETE, PRUNED or FAIL. On databases without a lock
(anything but journal files, SQLite and PostgreSQL), a trial created past the budget by such a race is told
FAIL at once with the system attr `masksweep:surplus` and left out of every count.
A worker with nothing left to ask waits while other workers still run trials (wait_for_running), so it can
retry one whose worker dies, then writes the final results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from masksweep.errors import MasksweepError, TrialDiverged, TrialStopped
from masksweep.interrupts import signals_raise
from masksweep.study import carry_intermediate_values
from masksweep.study import storage as B
from masksweep.study.heartbeat import (
    HeartbeatThread,
    WorkerIdentity,
    fail_and_retry,
    reap_stale_trials,
    superseded_numbers,
)
from masksweep.study.registry import SUMMARY_ATTR, StudyRegistry
from masksweep.tracking.parent import StudyParent

from ._results import budget_used, count_trials, save_plots, summarize, trial_label, write_results
from ._space import SearchSpace, SearchSpaceError, grid_space, parse_search_space, quote

if TYPE_CHECKING:
    from hydra.plugins.launcher import Launcher
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

# The job-config keys that carry the trial's identity (conf/train.yaml's `optuna:` block).
IDENTITY_KEYS = ("optuna.storage", "optuna.study_name", "optuna.trial_number")
TRIAL_NAME_ATTR = "trial_name"  # user attr: the report's name of a trial (`trial4`), for optuna-dashboard
STUDY_DIR_ATTR = "masksweep:sweep_dir"  # study: the first worker's sweep dir, where the one summary goes
_ERROR_CHARS = 2000


class SweepError(MasksweepError):
    """The sweep cannot start or cannot go on; the message says why and what to change."""


class FailureRateExceeded(SweepError):
    """More than max_failure_rate * n_trials trials failed."""


@dataclass
class Settings:
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    direction: str = "maximize"
    n_trials: int = 20
    storage: str | None = None
    study_name: str | None = None
    max_failure_rate: float = 0.25
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int | None = 3
    wait_for_running: bool = True
    n_jobs: int | None = None
    params: dict[str, Any] | None = None
    check_config: str | None = None
    study_parent_run: bool = True

    def __post_init__(self) -> None:
        self.direction = str(self.direction).lower()
        if self.direction not in ("maximize", "minimize"):
            raise SweepError(
                f"hydra.sweeper.direction={self.direction!r} is invalid; allowed: maximize, minimize "
                "(one objective: the task returns one float)"
            )
        if int(self.n_trials) < 1:
            raise SweepError(f"hydra.sweeper.n_trials={self.n_trials} is invalid; allowed: an integer >= 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise SweepError(
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} is invalid; allowed: 0..1"
            )
        if int(self.heartbeat_interval) < 1:
            raise SweepError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} is invalid; allowed: >= 1 s"
            )
        if self.grace_period is None:
            self.grace_period = 2 * int(self.heartbeat_interval) + 60
        if int(self.grace_period) <= int(self.heartbeat_interval):
            raise SweepError(
                f"hydra.sweeper.grace_period={self.grace_period} must exceed heartbeat_interval="
                f"{self.heartbeat_interval}, or live trials would be taken for stale ones"
            )
        if self.n_jobs is None:
            self.n_jobs = 1
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise SweepError(
                f"hydra.sweeper.n_jobs={self.n_jobs!r} is invalid; allowed: an integer >= 1 (trials launched "
                "together through hydra/launcher)"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Settings:
        plain = {
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
            for k, v in kwargs.items()
        }
        return cls(**plain)


# ---------------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    state: TrialState
    value: float | None = None
    user_attrs: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    retry: bool = False  # FAIL, then enqueue the same params again (the job was interrupted by a signal)


def _finite_or_text(value: float | None) -> float | str | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else str(value)


def _objective(value: Any, metric: str | None) -> tuple[float | None, str]:
    """The job's return value as the objective, or (None, why not)."""
    if isinstance(value, Mapping):
        if metric is not None and metric in value:
            return _objective(value[metric], None)
        return None, (
            f"the task returned a mapping without the optimized metric {metric!r}; return the metric "
            "as a float"
        )
    if value is None:
        return None, "the task returned None; it must return the optimized metric as a float"
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "item")):
        return None, f"the task returned {type(value).__name__} {value!r:.80}; it must return a float"
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as err:
        return None, f"the task returned {value!r:.80}, which is not a float: {err}"
    if not math.isfinite(number):
        return None, f"the task returned {number}, which is not a finite number"
    return number, ""


def _is(exc: BaseException, cls: type[BaseException]) -> bool:
    """isinstance, or the same class name in the MRO: an exception that crossed a process boundary may come
    back as an equal class from a re-imported module."""
    return isinstance(exc, cls) or any(c.__name__ == cls.__name__ for c in type(exc).__mro__)


def interrupted(exc: BaseException) -> bool:
    """A job stopped by SIGINT / SIGTERM (KeyboardInterrupt, or the trial's own *Interrupted error): nothing
    is wrong with its params, so the trial is retried."""
    return any("Interrupt" in c.__name__ for c in type(exc).__mro__)


def classify(ret: JobReturn, metric: str | None = None) -> Outcome:
    """How a launched job ended, in Optuna's terms."""
    if ret.status == JobStatus.COMPLETED:
        value, why = _objective(ret._return_value, metric)
        if value is None:
            return Outcome(TrialState.FAIL, user_attrs={"error": why}, message=why)
        return Outcome(TrialState.COMPLETE, value=value)
    exc = ret._return_value
    if ret.status == JobStatus.FAILED and isinstance(exc, BaseException):
        if _is(exc, TrialDiverged):
            reason = str(getattr(exc, "reason", exc))
            attrs = {
                "diverged": True,
                "divergence_reason": reason,
                "divergence_step": getattr(exc, "step", None),
                "divergence_detected_at": getattr(exc, "detected_at", None),
                "divergence_value": _finite_or_text(getattr(exc, "value", None)),
            }
            return Outcome(TrialState.PRUNED, user_attrs=attrs, message=f"diverged: {reason}")
        if _is(exc, TrialStopped):
            reason = str(getattr(exc, "reason", exc))
            attrs = {"pruned_reason": reason, "pruned_step": getattr(exc, "step", None)}
            return Outcome(TrialState.PRUNED, user_attrs=attrs, message=f"pruned: {reason}")
        text = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        if interrupted(exc):
            attrs = {"error": text}
            return Outcome(TrialState.FAIL, user_attrs=attrs, message=f"interrupted: {text}", retry=True)
        return Outcome(TrialState.FAIL, user_attrs={"error": text}, message=text)
    why = f"job ended with status {ret.status.name}: {exc!r:.200}"
    return Outcome(TrialState.FAIL, user_attrs={"error": why}, message=why)


# ---------------------------------------------------------------------------------------------- samplers
class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler calls study.stop() when the grid is done, which raises outside Study.optimize(). The
    sweeper decides itself when the grid is exhausted (see _grid_left)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


_SAMPLER_KWARGS: dict[str, tuple[str, ...]] = {
    "tpe": ("seed", "n_startup_trials", "multivariate", "constant_liar"),
    "random": ("seed",),
    "grid": ("seed",),
    "qmc": ("seed", "qmc_type"),
    "cmaes": ("seed", "n_startup_trials"),
}


def build_sampler(
    cfg: Mapping[str, Any], space: SearchSpace, worker_index: int
) -> optuna.samplers.BaseSampler:
    name = str(cfg.get("name") or "tpe").lower()
    if name not in _SAMPLER_KWARGS:
        raise SweepError(
            f"hydra.sweeper.sampler.name={name!r} is unknown; allowed: {', '.join(_SAMPLER_KWARGS)}"
        )
    kwargs = {k: v for k, v in cfg.items() if k in _SAMPLER_KWARGS[name] and v is not None}
    ignored = sorted(
        k for k, v in cfg.items() if k != "name" and v is not None and k not in _SAMPLER_KWARGS[name]
    )
    if ignored:
        log.warning("sampler %s ignores %s", name, ", ".join(ignored))
    # Parallel workers (and resumed runs) with one seed would replay the same random points; grid and qmc
    # workers must share theirs, since it fixes the order of their point sequence.
    if name in ("tpe", "random", "cmaes") and kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + worker_index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(**kwargs)
        if name == "random":
            return optuna.samplers.RandomSampler(**kwargs)
        if name == "grid":
            return _GridSampler(grid_space(space), **kwargs)
        if name == "qmc":
            return optuna.samplers.QMCSampler(**kwargs)
        categorical = [n for n, d in space.distributions.items() if isinstance(d, CategoricalDistribution)]
        if categorical:
            raise SweepError(
                f"sampler cmaes cannot search categorical params ({', '.join(categorical)}); use tpe, or "
                "make them fixed overrides"
            )
        return optuna.samplers.CmaEsSampler(**kwargs)


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise SearchSpaceError(f"{name}: unsupported distribution {dist!r}")


def default_study_name(name: str, space: SearchSpace, direction: str) -> str:
    """<sweep name>-<6 hex>, e.g. `lr_wd-3fa2c1`: readable, and stable for the same command, so re-running it
    resumes the study while other overrides (`optimizer=adamw`) get their own."""
    key = json.dumps(
        {"space": space.describe(), "fixed": sorted(space.fixed), "direction": direction}, sort_keys=True
    )
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def sweep_name(config: DictConfig) -> str:
    """The selected `sweep=NAME` overlay, else the job name."""
    choice = OmegaConf.select(config, "hydra.runtime.choices.sweep", default=None)
    return str(choice) if choice else str(config.hydra.job.name)


# ---------------------------------------------------------------------------------------------- the sweeper
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
        _exclude_identity_from_override_dirname(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        s = self.settings
        space, sampler_name, n_trials = self._check_space(arguments)
        study_name = s.study_name or default_study_name(sweep_name(self.config), space, s.direction)
        try:
            self.spec = B.parse_storage(s.storage, study_name)
        except B.StorageSpecError as err:
            raise SweepError(str(err)) from err
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        study, worker_index, existing = self._open_study(study_name)
        self.study = study
        self.registry = StudyRegistry(self.storage, study_name, self.lock)
        log.info(
            "study %s: %d trials so far, budget n_trials=%d, sampler %s, pruner %s, worker %d, n_jobs %d",
            study_name,
            existing,
            n_trials,
            sampler_name,
            B.pruner_spec(s.pruner)["name"],
            worker_index,
            s.n_jobs,
        )
        log.info("  open it: %s", self.spec.dashboard_hint(study_name))
        for name, dist in space.distributions.items():
            log.info("  %s: %r", name, dist)

        grace = float(s.grace_period or 0)
        self._launched = False
        others_live = bool(self.registry.live_workers(self.me, grace))
        self.registry.join(self.me)
        self.heartbeat = HeartbeatThread(
            self.storage, self.spec.kind, s.heartbeat_interval, on_beat=lambda: self.registry.beat(self.me)
        )
        self.heartbeat.start()
        returns: list[Sequence[JobReturn]] = []
        self.parent: StudyParent | None = None
        error: BaseException | None = None
        try:
            # `kill <sweeper>` stops the sweep as Ctrl-C does (its trials FAIL and are queued again) instead
            # of ending the process where it stands, with the parent run and the trials left RUNNING.
            with signals_raise():
                study_dir, _ = self.registry.claim(STUDY_DIR_ATTR, lambda: str(self.sweep_dir.absolute()))
                self.study_dir = Path(study_dir) if Path(study_dir).is_dir() else self.sweep_dir
                if s.study_parent_run:
                    self.parent = StudyParent.open(
                        self.config,
                        self.registry,
                        study_name,
                        self.spec.describe(),
                        self.sweep_dir,
                        others_live,
                    )
                self._loop(returns)
        except BaseException as err:
            error = err
            raise
        finally:
            self.heartbeat.stop()
            try:
                self._end(error)
            finally:
                self.lock.close()
        return returns

    def _check_space(self, arguments: list[str]) -> tuple[SearchSpace, str, int]:
        """Everything about the search space that can be wrong, checked before any storage or run is made."""
        s = self.settings
        try:
            space = parse_search_space(s.params, arguments)
        except SearchSpaceError as err:
            raise SweepError(f"search space: {err}") from err
        if not space.distributions:
            log.warning("the search space is empty: every trial runs the same config")
        sampler_name = str(s.sampler.get("name") or "tpe").lower()
        n_trials = int(s.n_trials)
        self._grid: dict[str, list[Any]] | None = None
        if sampler_name == "grid":
            try:
                self._grid = grid_space(space)
            except SearchSpaceError as err:
                raise SweepError(str(err)) from err
            # Grid trials record categorical distributions: the grid's values are the whole space.
            space.distributions = {n: CategoricalDistribution(v) for n, v in self._grid.items()}
            size = math.prod(len(v) for v in self._grid.values())
            if size < n_trials:
                log.info("sampler grid has %d points: n_trials %d -> %d", size, n_trials, size)
                n_trials = size
        self.space, self.n_trials = space, n_trials
        build_sampler(s.sampler, space, 0)  # a sampler/space mismatch
        try:
            B.pruner_spec(s.pruner)
        except ValueError as err:
            raise SweepError(str(err)) from None
        self._probe_configs(space)
        return space, sampler_name, n_trials

    def _probe_configs(self, space: SearchSpace) -> None:
        """Compose (and check with `check_config`) a job config at every choice and both ends of every range,
        so `lr=choice(-1)` or `optimizer=choice(sgd, foo)` stops the sweep before its first trial."""
        assert self.hydra_context is not None and self.config is not None
        check = _load_check(self.settings.check_config)
        base = {name: _probe_values(dist)[0] for name, dist in space.distributions.items()}
        probes = [
            (name, value, {**base, name: value})
            for name, dist in space.distributions.items()
            for value in _probe_values(dist)
        ] or [(None, None, {})]
        for name, value, params in probes:
            overrides = space.job_overrides(params)
            where = "the fixed overrides" if name is None else f"{name}={value}"
            try:
                job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as err:
                raise SweepError(f"search space: {where} does not compose: {_one_line(err)}") from None
            if check is not None:
                try:
                    with read_write(job_cfg), open_dict(job_cfg):
                        check(job_cfg)
                except MasksweepError as err:
                    raise SweepError(f"search space: {where}: {err}") from None
                except Exception as err:
                    raise SweepError(
                        f"hydra.sweeper.check_config={self.settings.check_config} cannot check this app's "
                        f"config ({type(err).__name__}: {_one_line(err)}); allowed: a check for this app, or "
                        "null"
                    ) from None

    def _open_study(self, study_name: str) -> tuple[optuna.Study, int, int]:
        s = self.settings
        retry_cb = None
        if self.spec.kind == "rdb":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry_cb = B.retry_callback_class()(max_retry=s.max_retry)
        pruner = B.pruner_spec(s.pruner)
        self.lock = B.study_lock(self.spec, study_name)
        try:
            with self.lock.hold():
                # Under the lock: workers starting together on an empty database would race to create
                # Optuna's tables.
                self.storage = B.open_storage(
                    self.spec,
                    heartbeat_interval=s.heartbeat_interval if self.spec.kind == "rdb" else None,
                    grace_period=s.grace_period,
                    stale_trial_callback=retry_cb,
                )
                study = optuna.create_study(
                    study_name=study_name,
                    storage=self.storage,
                    direction=s.direction,
                    load_if_exists=True,
                    pruner=B.build_pruner(pruner),
                )
                self._check_direction(study)
                study_id = self.storage.get_study_id_from_name(study_name)
                attrs = self.storage.get_study_system_attrs(study_id)
                if attrs.get(B.PRUNER_ATTR) != pruner:
                    self.storage.set_study_system_attr(study_id, B.PRUNER_ATTR, pruner)
                worker_index = int(attrs.get(B.WORKERS_ATTR, 0))
                self.storage.set_study_system_attr(study_id, B.WORKERS_ATTR, worker_index + 1)
                study.sampler = build_sampler(s.sampler, self.space, worker_index)
                existing = len(study.get_trials(deepcopy=False))
        except BaseException:
            self.lock.close()
            raise
        return study, worker_index, existing

    def _check_direction(self, study: optuna.Study) -> None:
        if len(study.directions) != 1:
            raise SweepError(
                f"study {study.study_name} is multi-objective; this sweeper handles one objective"
            )
        have = study.direction.name.lower()
        if have != self.settings.direction:
            raise SweepError(
                f"study {study.study_name} already exists with direction {have}, but "
                f"hydra.sweeper.direction is {self.settings.direction}; use another hydra.sweeper.study_name"
            )

    def _done(self, trials: list[FrozenTrial]) -> bool:
        c = count_trials(trials)
        return c.running == 0 and c.waiting == 0 and budget_used(trials) >= self.n_trials

    # ------------------------------------------------------------------ loop
    def _loop(self, returns: list[Sequence[JobReturn]]) -> None:
        poll = float(min(self.settings.heartbeat_interval, 10))
        told_waiting = False
        while True:
            batch = self._claim()
            if batch:
                told_waiting = False
                returns.append(self._run(batch))
                self._check_failure_rate()
                continue
            # Only trials run by masksweep workers: those beat, so a dead worker's trial is found and retried.
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
            time.sleep(poll)

    def _claim(self) -> list[optuna.Trial]:
        """Under the ask lock: reap stale trials, then ask up to n_jobs trials within the budget."""
        s, study, storage = self.settings, self.study, self.storage
        batch: list[optuna.Trial] = []
        with self.lock.hold():
            reap_stale_trials(
                study, storage, self.spec.kind, self.me, float(s.grace_period or 0), s.max_retry
            )
            self._check_failure_rate()
            while len(batch) < int(s.n_jobs or 1):
                trial = self._ask()
                if trial is None:
                    break
                batch.append(trial)
        return batch

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
                _suggest(trial, name, dist)
        except Exception as err:
            self.heartbeat.untrack(trial._trial_id)
            msg = f"could not suggest params for trial {trial.number}: {err}"
            trial.set_user_attr("error", msg[:_ERROR_CHARS])
            study.tell(trial, state=TrialState.FAIL)
            raise SweepError(f"{msg} (did the search space change since the study started?)") from err
        if not self.lock.exact and self._is_surplus(trial):
            self.heartbeat.untrack(trial._trial_id)
            return None
        return trial

    def _grid_left(self, trials: list[FrozenTrial]) -> int | None:
        """Grid points not yet handed to any trial; None when the sampler is not grid."""
        if self._grid is None:
            return None
        ours = {k: list(v) for k, v in sorted(self._grid.items())}
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

    def _check_failure_rate(self, trials: list[FrozenTrial] | None = None) -> None:
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

    # ------------------------------------------------------------------ one batch
    def _job_overrides(self, trial: optuna.Trial) -> list[str]:
        identity = [
            f"++optuna.storage={quote(self.spec.url)}",
            f"++optuna.study_name={quote(self.study.study_name)}",
            f"++optuna.trial_number={trial.number}",
        ]
        # A batch's trial numbers need not be consecutive (a retry popped from the queue, another worker's
        # asks), but the launcher numbers its jobs consecutively: keep each trial's own directory.
        assert self.config is not None
        raw = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        keep_dir = [f"hydra.sweep.subdir={trial.number}"] if raw == "${hydra.job.num}" else []
        return [*self.space.job_overrides(trial.params), *keep_dir, *identity]

    def _run(self, batch: list[optuna.Trial]) -> Sequence[JobReturn]:
        """Launch the batch as one `launcher.launch` call; tell Optuna how each trial ended."""
        assert self.launcher is not None and self.hydra_context is not None and self.config is not None
        jobs: list[list[str]] = []
        results: dict[int, JobReturn] = {}
        for trial in batch:
            overrides = self._job_overrides(trial)
            try:
                # Compose first, so a bad param value fails this trial instead of the whole sweep.
                job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as err:
                ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
                ret._return_value = err
                results[trial.number] = ret
                continue
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
            jobs.append(overrides)
        launched = [t for t in batch if t.number not in results]
        self._launched = self._launched or bool(launched)
        try:
            returns = list(self.launcher.launch(jobs, initial_job_idx=launched[0].number)) if launched else []
        except BaseException as err:
            # Ctrl-C, SIGTERM or a launcher failure (e.g. a joblib worker killed): fail the trials and queue
            # them again, so a resumed sweep re-runs them.
            self.heartbeat.untrack()
            for trial in launched:
                frozen = self.storage.get_trial(trial._trial_id)
                if frozen.state == TrialState.RUNNING:
                    fail_and_retry(
                        self.study,
                        self.storage,
                        frozen,
                        f"interrupted: {type(err).__name__}: {_one_line(err)}",
                        self.settings.max_retry,
                    )
            if isinstance(err, Exception) and not isinstance(err, MasksweepError):
                raise SweepError(
                    f"the launcher failed: {type(err).__name__}: {_one_line(err)}; the batch's trials are "
                    "queued again: run the same command to resume the study"
                ) from err
            raise
        finally:
            for trial in batch:
                if trial.number in results:
                    self.heartbeat.untrack(trial._trial_id)
        results.update({t.number: r for t, r in zip(launched, returns, strict=True)})
        stop: Outcome | None = None
        for trial in batch:
            ret = results[trial.number]
            self.heartbeat.untrack(trial._trial_id)
            metric = OmegaConf.select(ret.cfg, "optimized_metric") if ret.cfg is not None else None
            outcome = classify(ret, metric if isinstance(metric, str) else None)
            self._tell(trial, outcome, ret)
            if outcome.retry and _in_this_process(self.launcher):
                stop = outcome
        if stop is not None:  # the signal was meant for this process too: stop the sweep, one line
            raise SweepInterrupted(f"sweep {stop.message}; run the same command again to resume the study")
        return [results[t.number] for t in batch]

    def _tell(self, trial: optuna.Trial, outcome: Outcome, ret: JobReturn) -> None:
        label = trial_label(trial.number, trial.user_attrs.get(TRIAL_NAME_ATTR))
        if outcome.state == TrialState.FAIL and not outcome.retry:
            exc = ret._return_value if isinstance(ret._return_value, BaseException) else None
            log.error("%s failed: %s", label, outcome.message, exc_info=exc)
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
            self.n_trials,
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

    # ------------------------------------------------------------------ end
    def _end(self, error: BaseException | None) -> None:
        """This worker leaves. The study done: its one summary (by whichever worker gets there first) and
        its parent run FINISHED. Not done: the live workers carry on; the last one ends the parent."""
        try:
            self.registry.leave(self.me)
            trials = self.study.get_trials(deepcopy=False)
            done = self._done(trials)
            last = not self.registry.live_workers(self.me, float(self.settings.grace_period or 0))
            if not done and not last:
                log.info("this worker stops; the study goes on with its other live workers")
                return
            if not done and not self._launched:
                return  # stopped before its first trial (e.g. the tracking store was unreachable)
            aborted = isinstance(error, FailureRateExceeded)
            status = "finished" if done else ("aborted" if aborted else "partial")
            finished = count_trials(trials).finished
            _, mine = self.registry.claim(
                SUMMARY_ATTR,
                lambda: {"finished": finished, "status": status, "by": self.me.id},
                replace=lambda rec: rec.get("finished") != finished or rec.get("status") != status,
            )
            if mine:
                self._write_summary(status, str(error) if aborted else None)
            else:
                log.info("study %s: its results were written by another worker", self.study.study_name)
            if self.parent is not None:
                if done:
                    if mine:
                        self._score_best_on_test()
                    self.parent.finish(self.study_dir if mine else None)
                else:
                    kind = "KILLED" if error is not None and interrupted(error) else "FAILED"
                    why = f"the study stopped before n_trials: {error or status}"
                    self.parent.stop(kind, _one_line(why))
        except Exception as exc:  # never hide the sweep's own outcome behind a reporting problem
            log.warning("could not end the study's records: %s", _one_line(exc))

    def _score_best_on_test(self) -> None:
        """The study's best trial (by the optimized val metric), scored once on the held-out test split when
        its config has one (`data.test`): `test/*` on the trial's run and on the parent. The study is done
        by now, so no pruning or selection can read these numbers. A failure here is logged, never raised:
        the study's trials are already recorded."""
        assert self.parent is not None and self.hydra_context is not None and self.config is not None
        try:
            best = self.study.best_trial
        except ValueError:  # no COMPLETE trial
            return
        label = trial_label(best.number, best.user_attrs.get(TRIAL_NAME_ATTR))
        try:
            job_cfg = self.hydra_context.config_loader.load_sweep_config(
                self.config, self.space.job_overrides(best.params)
            )
            if OmegaConf.select(job_cfg, "data.test", default=None) is None:
                return
            from masksweep.rescore import evaluate_run_on_test

            run_id = self.parent.trial_run_id(self.study.study_name, best.number)
            if run_id is None:
                log.warning(
                    "study %s: no finished MLflow run of %s to score on the test split",
                    self.study.study_name,
                    label,
                )
                return
            metrics = evaluate_run_on_test(run_id, self.parent.client.tracking_uri)
            self.parent.log_metrics(metrics)
        except Exception as exc:
            log.warning("could not score %s on the test split: %s", label, _one_line(exc))
            return
        log.info(
            "study %s: best trial %s on the held-out test split: %s",
            self.study.study_name,
            label,
            "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("ap_bbox", "ap_segm", "iou_global"))
            ),
        )

    def _write_summary(self, status: str, message: str | None) -> None:
        try:
            summarize(self.study, self.n_trials)
            plots = save_plots(self.study, self.study_dir)
            write_results(
                self.study,
                self.study_dir,
                storage=self.spec.describe(),
                n_trials=self.n_trials,
                direction=self.settings.direction,
                status=status,
                message=message,
                plots=plots,
            )
        except Exception:
            log.exception("could not write the sweep results to %s", self.study_dir)


class SweepInterrupted(SweepError):
    """SIGINT / SIGTERM stopped the sweep; its trial was failed and queued again."""


def _in_this_process(launcher: Any) -> bool:
    """Hydra's basic launcher runs jobs in the sweeper's own process (a signal to the job is one to us)."""
    return type(launcher).__name__ == "BasicLauncher"


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _probe_values(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, (IntDistribution, FloatDistribution)):
        return [dist.low] if dist.low == dist.high else [dist.low, dist.high]
    raise SearchSpaceError(f"unsupported distribution {dist!r}")


def _load_check(path: str | None) -> Any:
    """`module.function` -> the function (masksweep.validation.validate for masksweep-train)."""
    if not path:
        return None
    import importlib

    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SweepError(
            f"hydra.sweeper.check_config={path!r} cannot be imported ({err}); allowed: a module.function "
            "path, or null"
        ) from None


def _exclude_identity_from_override_dirname(config: DictConfig) -> None:
    """Keep optuna.* (a storage URL, a trial number) out of ${hydra.job.override_dirname}: each job's
    config is re-composed from the master's hydra overrides, so the exclusion goes there."""
    try:
        current = list(config.hydra.job.config.override_dirname.exclude_keys)
        missing = [k for k in IDENTITY_KEYS if k not in current]
        if not missing:
            return
        keys = current + missing
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.job.config.override_dirname.exclude_keys = keys
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"
            )
    except Exception as err:  # cosmetic: never stop a sweep for it
        log.debug("could not exclude %s from override_dirname: %s", IDENTITY_KEYS, err)


__all__ = [
    "FailureRateExceeded",
    "MasksweepOptunaSweeperImpl",
    "Settings",
    "SweepError",
    "SweepInterrupted",
    "classify",
]
