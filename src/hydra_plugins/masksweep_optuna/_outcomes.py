"""How a launched job ended, in Optuna's terms: COMPLETE with its value, PRUNED (pruner, divergence), FAIL."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from masksweep.errors import TrialDiverged, TrialStopped

ERROR_CHARS = 2000


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
        text = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
        if interrupted(exc):
            attrs = {"error": text}
            return Outcome(TrialState.FAIL, user_attrs=attrs, message=f"interrupted: {text}", retry=True)
        return Outcome(TrialState.FAIL, user_attrs={"error": text}, message=text)
    why = f"job ended with status {ret.status.name}: {exc!r:.200}"
    return Outcome(TrialState.FAIL, user_attrs={"error": why}, message=why)


def lost_job(exc: BaseException) -> Outcome:
    """A job that ended without a result: cancelled, killed, out of requeues, its node failed. Nothing is
    known to be wrong with its params, so the trial is retried from its last checkpoint."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"[:ERROR_CHARS]
    return Outcome(TrialState.FAIL, user_attrs={"error": text}, message=f"job lost: {text}", retry=True)


def with_log(outcome: Outcome, log_file: str | None) -> Outcome:
    """A failed trial's error names the job's log file, where its traceback is."""
    if outcome.state != TrialState.FAIL or not log_file:
        return outcome
    where = f" (log: {log_file})"
    error = str(outcome.user_attrs.get("error", ""))[: ERROR_CHARS - len(where)] + where
    attrs = {**outcome.user_attrs, "error": error}
    return replace(outcome, user_attrs=attrs, message=outcome.message + where)
