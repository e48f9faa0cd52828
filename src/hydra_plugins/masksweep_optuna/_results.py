"""End of a sweep: counts, the best trial, `optimization_results.yaml` and the plots, in the sweep directory.

The tracking module logs these files to the MLflow parent run from a Hydra callback (on_multirun_end), so this
only writes them. Several workers may end at the same time on one sweep directory: every file is written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masksweep.study import storage as B
from masksweep.study.heartbeat import superseded_numbers

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0  # PRUNED by the pruner (or another early stop), not diverged
    diverged: int = 0  # PRUNED with user attr diverged=True
    failed: int = 0  # FAIL, not counting stale trials that were retried
    running: int = 0
    waiting: int = 0
    retried: int = 0  # FAIL trials replaced by a retry (their retry stands in for them)
    interrupted: int = 0  # of those: stopped by a signal (SIGTERM, SIGINT), or their job ended with no result
    surplus: int = 0  # asked past the budget by a race; only on storages without an ask lock

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.diverged + self.failed

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "finished": self.finished}


def count_trials(trials: list[FrozenTrial]) -> Counts:
    from optuna.trial import TrialState

    superseded = superseded_numbers(trials)
    c = Counts()
    for t in trials:
        if t.system_attrs.get(B.SURPLUS_ATTR):
            c.surplus += 1
        elif t.number in superseded:
            c.retried += 1
            c.interrupted += retry_cause(t) != "stale"
        elif t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            if t.user_attrs.get("diverged"):
                c.diverged += 1
            else:
                c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    return c


def retry_cause(t: FrozenTrial) -> str:
    """Why a retried trial failed: `stale` (its worker stopped beating), `interrupted` (a signal) or
    `job lost` (its scheduler job ended without a result), as heartbeat.fail_and_retry recorded it."""
    return str(t.system_attrs.get(B.STALE_ATTR, "stale")).split(":", 1)[0]


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count against n_trials: all of them except retried stale ones and surplus ones."""
    superseded = superseded_numbers(trials)
    return sum(1 for t in trials if t.number not in superseded and not t.system_attrs.get(B.SURPLUS_ATTR))


def trial_label(number: int, name: Any = None) -> str:
    """`trial4 (#3)`: the report's name next to Optuna's number, or `#3` alone."""
    return f"{name} (#{number})" if name else f"#{number}"


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def _plain(value: Any) -> Any:
    """YAML-friendly: non-finite floats as strings, containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    row: dict[str, Any] = {
        "number": t.number,
        **({"trial_name": t.user_attrs["trial_name"]} if "trial_name" in t.user_attrs else {}),
        "state": t.state.name,
        "value": t.value,
        "params": dict(t.params),
    }
    for key in ("diverged", "divergence_reason", "divergence_step", "pruned_reason", "pruned_step", "error"):
        if key in t.user_attrs:
            row[key] = t.user_attrs[key]
    if B.RETRY_FROM_ATTR in t.system_attrs:
        row["retry_of"] = t.system_attrs[B.RETRY_FROM_ATTR]
    return _plain(row)


def summarize(study: optuna.Study, n_trials: int) -> tuple[Counts, FrozenTrial | None]:
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    best = _best(study)
    if best is not None:
        log.info(
            "best trial %s: value %s, params %s",
            trial_label(best.number, best.user_attrs.get("trial_name")),
            best.value,
            best.params,
        )
    else:
        log.info("no trial completed, so there is no best trial")
    log.info(
        "study %s: %d complete, %d pruned, %d diverged, %d failed "
        "(%d of n_trials=%d finished; %d retried: %d stale, %d interrupted or lost)",
        study.study_name,
        counts.complete,
        counts.pruned,
        counts.diverged,
        counts.failed,
        counts.finished,
        n_trials,
        counts.retried,
        counts.retried - counts.interrupted,
        counts.interrupted,
    )
    _print_table(study, trials, best)
    return counts, best


def _print_table(study: optuna.Study, trials: list[FrozenTrial], best: FrozenTrial | None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    superseded = superseded_numbers(trials)
    table = Table(title=f"study {study.study_name}", show_lines=False)
    for col in ("trial", "state", "value", "params", "note"):
        table.add_column(col, overflow="fold")
    for t in trials:
        note = ""
        if t.number in superseded:
            note = f"{retry_cause(t)}, retried"
        elif t.user_attrs.get("diverged"):
            note = f"diverged: {t.user_attrs.get('divergence_reason', '')}"
        elif "pruned_reason" in t.user_attrs:
            note = str(t.user_attrs["pruned_reason"])
        elif "error" in t.user_attrs:
            note = str(t.user_attrs["error"])[:120]
        mark = " *" if best is not None and t.number == best.number else ""
        value = "" if t.value is None else f"{t.value:.6g}"
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
        )
        label = trial_label(t.number, t.user_attrs.get("trial_name"))
        table.add_row(f"{label}{mark}", t.state.name, value, params, note)
    Console(stderr=True).print(table)


def write_results(
    study: optuna.Study,
    sweep_dir: Path,
    *,
    storage: str,
    n_trials: int,
    direction: str,
    status: str,
    message: str | None = None,
    plots: Mapping[str, Any] | None = None,
    compute: Mapping[str, float] | None = None,
) -> Path:
    import yaml

    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    best = _best(study)
    doc: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": storage,
        "direction": direction,
        "n_trials": n_trials,
        "status": status,
        "counts": counts.as_dict(),
        # device_hours, saved_device_hours, slot_utilization (masksweep.study.compute); parent-run metrics
        "compute": dict(compute or {}),
        "best": None
        if best is None
        else {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "user_attrs": dict(best.user_attrs),
        },
        "trials": [trial_row(t) for t in trials],
    }
    if message:
        doc["message"] = message
    if plots:
        doc["plots"] = dict(plots)
    path = sweep_dir / RESULTS_FILE
    _atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(_plain(doc), sort_keys=False)))
    log.info("results written to %s", path)
    return path


def save_plots(study: optuna.Study, sweep_dir: Path) -> dict[str, Any]:
    """Optimization history and parameter importances as PNGs; a reason instead of a skipped file."""
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")  # headless: a sweep often runs over ssh or in a batch job
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm
    except ImportError as err:
        reason = f"matplotlib is not available ({err})"
        log.warning("plots skipped: %s", reason)
        return {"optimization_history": None, "param_importances": None, "skipped": reason}

    import warnings

    def save(ax_or_axes: Any, name: str) -> None:
        ax = (
            ax_or_axes[0]
            if hasattr(ax_or_axes, "__len__") and not hasattr(ax_or_axes, "figure")
            else ax_or_axes
        )
        fig = ax.figure
        _atomic_write(
            sweep_dir / name, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        )
        plt.close(fig)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning from optuna.visualization.matplotlib
        if not complete:
            out["optimization_history"] = None
            out["optimization_history_skipped"] = "no complete trial"
            log.info("optimization-history plot skipped: no complete trial")
        else:
            try:
                save(ovm.plot_optimization_history(study), HISTORY_PNG)
                out["optimization_history"] = HISTORY_PNG
            except Exception as err:
                out["optimization_history"] = None
                out["optimization_history_skipped"] = f"{type(err).__name__}: {err}"
                log.warning("optimization-history plot skipped: %s", err)

        reason = _importance_blocker(complete)
        if reason is None:
            try:
                save(ovm.plot_param_importances(study), IMPORTANCE_PNG)
                out["param_importances"] = IMPORTANCE_PNG
            except Exception as err:
                reason = f"could not be computed ({type(err).__name__}: {err})"
        if reason is not None:
            out["param_importances"] = None
            out["param_importances_skipped"] = reason
            log.info("parameter-importance plot skipped: %s", reason)
    return out


def _importance_blocker(complete: list[FrozenTrial]) -> str | None:
    if len(complete) < 2:
        return f"needs at least 2 complete trials, the study has {len(complete)}"
    names = set().union(*(t.distributions for t in complete))
    varying = [n for n in names if len({repr(t.params.get(n)) for t in complete}) > 1]
    if len(varying) < 2:
        return f"needs at least 2 parameters that vary across complete trials, found {len(varying)}"
    return None


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
