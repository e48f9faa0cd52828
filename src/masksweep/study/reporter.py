"""TrialReporter: the training loop's handle on its Optuna trial, reached through the shared storage.

The sweeper plugin asks Optuna for a trial and launches the job with
`optuna.storage`, `optuna.study_name` and `optuna.trial_number` in its config. The job loads the study from
that storage and wraps the RUNNING trial in an `optuna.trial.Trial`: Optuna's own object, valid for a trial
created by ask() in another process because everything it does (report, should_prune, user attrs) reads and
writes the storage by trial id. So reporting works the same with the basic launcher (in-process) and with
process launchers (joblib, submitit).

    reporter = TrialReporter.from_config(cfg.optuna)   # None outside a sweep
    for epoch in range(cfg.epochs):
        ...
        if reporter is not None:
            reporter.report(metrics[cfg.optimized_metric], step=epoch)   # may raise TrialPruned

The pruner is the one the sweeper configured: it stores its settings in the study (system attr
`masksweep:pruner`), and the reporter builds the same pruner from them.

optuna is imported lazily, so `masksweep-train --help` stays fast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from masksweep.errors import ConfigError, TrialPruned, TrialStopped
from masksweep.study import storage as S

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# One storage per URL and process: in-process jobs (basic launcher) reuse it instead of replaying the journal
# or opening a database engine per trial.
_STORAGES: dict[str, Any] = {}
_STORAGES_LOCK = threading.Lock()


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _storage_for(url: str) -> Any:
    with _STORAGES_LOCK:
        storage = _STORAGES.get(url)
        if storage is None:
            # Jobs get the canonical absolute URL, so the launch directory does not matter here.
            spec = S.parse_storage(url, study_name="unused")
            storage = S.open_storage(spec)
            _STORAGES[url] = storage
        return storage


class TrialReporter:
    """Reports per-epoch values to one RUNNING Optuna trial and applies the study's pruner."""

    def __init__(
        self,
        trial: optuna.trial.Trial,
        pruner_name: str,
        storage: Any = None,
        study_id: int | None = None,
        trial_id: int | None = None,
    ) -> None:
        self._trial = trial
        self.pruner_name = pruner_name
        self._storage, self._study_id, self._trial_id = storage, study_id, trial_id
        self._carried = storage is None  # values of dead attempts are carried before the first report

    @classmethod
    def from_config(cls, optuna_cfg: Any) -> TrialReporter | None:
        """The reporter for the trial named in the job's `optuna:` block; None outside a sweep."""
        number = _get(optuna_cfg, "trial_number")
        if number is None:
            return None
        storage_url = _get(optuna_cfg, "storage")
        study_name = _get(optuna_cfg, "study_name")
        if not storage_url:
            raise ConfigError(
                "optuna.storage", storage_url, "the study's storage URL when optuna.trial_number is set"
            )
        if not study_name:
            raise ConfigError(
                "optuna.study_name", study_name, "the study name when optuna.trial_number is set"
            )

        import warnings

        import optuna

        storage = _storage_for(str(storage_url))
        try:
            study_id = storage.get_study_id_from_name(str(study_name))
        except KeyError:
            raise ConfigError("optuna.study_name", study_name, f"a study in {storage_url}") from None
        spec = storage.get_study_system_attrs(study_id).get(S.PRUNER_ATTR) or {"name": "median"}
        # A RandomSampler: Trial() calls sampler.before_trial, and e.g. GridSampler's would write to the
        # trial.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.load_study(
                study_name=str(study_name),
                storage=storage,
                sampler=optuna.samplers.RandomSampler(),
                pruner=S.build_pruner(spec),
            )
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
        except KeyError:
            raise ConfigError("optuna.trial_number", number, f"a trial of study {study_name}") from None
        frozen = storage.get_trial(trial_id)
        if frozen.state != optuna.trial.TrialState.RUNNING:
            raise ConfigError(
                "optuna.trial_number", number, f"a RUNNING trial (trial {number} is {frozen.state.name})"
            )
        return cls(
            optuna.trial.Trial(study, trial_id), str(spec.get("name", "median")), storage, study_id, trial_id
        )

    @property
    def number(self) -> int:
        return self._trial.number

    @property
    def params(self) -> dict[str, Any]:
        return self._trial.params

    def report(self, value: float, step: int) -> None:
        """Record `value` at epoch `step`; raise TrialPruned when the study's pruner says so."""
        import optuna

        value = float(value)
        step = int(step)
        try:
            if not self._carried:
                self._carried = True
                self._carry_dead_attempts(before=step)
            self._trial.report(value, step)
            prune = self._trial.should_prune()
        except optuna.exceptions.UpdateFinishedTrialError:
            # The sweeper took this trial for stale (its worker stopped beating) and queued a retry: stop
            # here.
            raise TrialStopped(
                reason=f"trial {self.number} was already finished by another worker", step=step, value=value
            ) from None
        if prune:
            raise TrialPruned(reason=f"pruner {self.pruner_name} at epoch {step}", step=step, value=value)

    def resume(self, history: Mapping[int, float]) -> None:
        """A retry resumed from its dead attempt's checkpoint: report the epochs it resumes past (the
        checkpoint's own record of them; the attempt may have died before it reported the last one) and apply
        the pruner to the last, so the trial is pruned as if there had been no kill. May raise TrialPruned."""
        self._carried = True
        have = set(self._storage.get_trial(self._trial_id).intermediate_values)
        self._carry({int(k): float(v) for k, v in history.items() if int(k) not in have})

    def _carry_dead_attempts(self, before: int) -> None:
        """Without a checkpoint's history: the values the dead attempts reported for the epochs before the
        first one this attempt reports."""
        self._carry(values_to_carry(self._storage, self._study_id, self._trial_id, before))

    def _carry(self, values: Mapping[int, float]) -> None:
        for step, value in sorted(values.items()):
            self._trial.report(value, step)  # through the Trial, so its should_prune() sees them
        if values:
            last = max(values)
            log.info("trial %d: carried %d epoch values of its dead attempt(s)", self.number, len(values))
            if self._trial.should_prune():
                raise TrialPruned(
                    reason=f"pruner {self.pruner_name} at epoch {last}", step=last, value=values[last]
                )

    def previous_attempt(self) -> tuple[int, dict[str, Any]] | None:
        """For a retry of a trial whose worker died: that trial's number and user attrs (e.g. where it
        checkpointed), so the retry resumes instead of starting over. None for a first attempt."""
        attempts = dead_attempts(self._storage, self._study_id, self._trial_id)
        if not attempts:
            return None
        # The latest dead attempt checkpointed furthest and may have left its MLflow run RUNNING; the earlier
        # ones were ended by the attempts that followed them.
        return attempts[-1].number, attempts[-1].user_attrs

    def set_user_attr(self, key: str, value: Any) -> None:
        """A JSON-serialisable attribute on the trial (shown in Optuna's dashboard and the sweep results)."""
        self._trial.set_user_attr(key, value)


def dead_attempts(storage: Any, study_id: int, trial_id: int) -> list[optuna.trial.FrozenTrial]:
    """The FAIL attempts this retried trial stands in for, oldest first (empty for a first attempt)."""
    history = storage.get_trial(trial_id).system_attrs.get(S.RETRY_HISTORY_ATTR) or []
    out = []
    for number in history:
        try:
            attempt_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
        except KeyError:
            continue
        out.append(storage.get_trial(attempt_id))
    return out


def values_to_carry(
    storage: Any, study_id: int, trial_id: int, before: int | None = None
) -> dict[int, float]:
    """The intermediate values of a retried trial's dead attempts that it lacks (epochs < `before`, or all of
    them); the latest attempt wins a step several attempts reported."""
    have = set(storage.get_trial(trial_id).intermediate_values)
    values: dict[int, float] = {}
    for attempt in dead_attempts(storage, study_id, trial_id):
        values.update(attempt.intermediate_values)
    return {
        int(step): float(value)
        for step, value in values.items()
        if step not in have and (before is None or step < before)
    }


def carry_intermediate_values(storage: Any, study_id: int, trial_id: int, before: int | None = None) -> int:
    """Write `values_to_carry` into the trial (the sweeper, before it tells a retry's outcome: a retry resumed
    after its last epoch reports nothing itself). Returns how many."""
    values = values_to_carry(storage, study_id, trial_id, before)
    for step, value in sorted(values.items()):
        storage.set_trial_intermediate_value(trial_id, step, value)
    return len(values)
