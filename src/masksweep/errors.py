"""Typed errors. Anything deriving from MasksweepError is shown to the user as one line."""

from __future__ import annotations


class MasksweepError(Exception):
    """Base class: a user-facing problem, printed as a single line by the CLIs."""


class ConfigError(MasksweepError, ValueError):
    """A config value is out of range or unknown. The message names key, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is invalid; allowed: {allowed}")

    def __reduce__(self) -> tuple:
        # Process launchers (joblib, submitit) pickle a job's exception back to the sweeper.
        return type(self), (self.key, self.value, self.allowed)


class DataError(MasksweepError):
    """A dataset file is missing, corrupt or inconsistent. The message names the file."""


class TrackingError(MasksweepError):
    """The tracking backend (MLflow) cannot be reached or queried."""


class TrialStopped(MasksweepError):
    """A trial ended early on purpose. Completed epochs stay recorded; the sweep goes on."""

    kind = "stopped"

    def __init__(
        self, reason: str, step: int, value: float | None = None, detected_at: int | None = None
    ) -> None:
        # step: where the problem began (e.g. the first bad step); detected_at: the step the trial stopped at.
        self.reason, self.step, self.value = reason, step, value
        self.detected_at = step if detected_at is None else detected_at
        detail = f" (value {value:.6g})" if value is not None else ""
        super().__init__(f"trial {self.kind} at step {step}: {reason}{detail}")

    def __reduce__(self) -> tuple:
        return type(self), (self.reason, self.step, self.value, self.detected_at)


class TrialPruned(TrialStopped):
    """The Optuna pruner judged the trial unpromising."""

    kind = "pruned"


class TrialDiverged(TrialStopped):
    """The divergence detector saw an exploding or non-finite loss."""

    kind = "diverged"
