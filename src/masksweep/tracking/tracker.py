"""One trial's MLflow run: params, batched metrics, artifacts, and its end state (FINISHED, KILLED, FAILED).

Everything goes through `MlflowClient` (no fluent global state), so a sweeper process and its trials never
share an "active run" by accident, and metrics go out in batches (`log_batch`) rather than one call each.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from masksweep.errors import TrackingError, TrialStopped
from masksweep.tracking.hydra_dirs import hydra_job_num, hydra_output_dir, sweep_dir
from masksweep.tracking.params import (
    MAX_PARAM_LENGTH,
    config_params,
    git_output,
    provenance,
    redacted_config,
    redacted_hydra_dir,
)
from masksweep.tracking.runs import MIN_PREFIX, RunNotFound, find_run, quoted, trial_runs_filter
from masksweep.tracking.store import (
    TRAIN_OPTION,
    RetryingClient,
    experiment_id,
    first_line,
    open_client,
    redact_uri,
)
from masksweep.tracking.tags import (
    MAX_TAG_LENGTH,
    PARENT_RUN_FILE,
    TAG_CHECKPOINT_DIR,
    TAG_ERROR,
    TAG_REQUEUES,
    TAG_RETRIED_AS,
    TAG_TRIAL_NAME,
)

log = logging.getLogger(__name__)

_EXTRA_TAGS: ContextVar[Mapping[str, str] | None] = ContextVar("masksweep_extra_run_tags", default=None)


@contextmanager
def extra_run_tags(tags: Mapping[str, str]) -> Iterator[None]:
    """Tags for the runs started inside the block (e.g. `masksweep.reproduced_from`)."""
    token = _EXTRA_TAGS.set({**(_EXTRA_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


def stop_tags(stop: TrialStopped) -> dict[str, str]:
    """The KILLED run's tags for a stopped trial (any TrialStopped subclass: kind, reason, step, value)."""
    return {
        "stop.kind": str(stop.kind),
        "stop.reason": str(stop.reason)[:MAX_TAG_LENGTH],
        "stop.step": str(stop.step),
        "stop.detected_at": str(stop.detected_at),
        "stop.value": repr(stop.value),
    }


class Tracker:
    """Records one trial. The base class records nothing: it is the tracker for `tracking=none`."""

    run_id: str | None = None
    reopened = False  # the run of an earlier attempt of this same trial (a requeued job), continued

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str, tags: Mapping[str, str] | None = None) -> None: ...
    def fail_abandoned(self, study_name: str, trial_number: int, retried_as: int) -> None: ...

    @contextmanager
    def recording(self) -> Iterator[Tracker]:
        """End the run FINISHED, KILLED (a stopped trial, with its reason) or FAILED (with the error).

        The exception always propagates; a tracking failure while recording it is logged, not raised over it.
        """
        try:
            yield self
        except TrialStopped as stop:
            self._finish_quietly("KILLED", stop_tags(stop))
            raise
        except KeyboardInterrupt as exc:  # masksweep.interrupts.Interrupted names its signal; Ctrl-C: SIGINT
            signal_name = getattr(exc, "name", "SIGINT")
            self._finish_quietly("KILLED", {"stop.kind": "interrupted", "stop.reason": signal_name})
            raise
        except SystemExit as exc:  # submitit's time-limit requeue exits the job this way; it comes back
            self._finish_quietly("KILLED", {"stop.kind": "exit", "stop.reason": f"SystemExit({exc.code})"})
            raise
        except BaseException as exc:
            self._record_error(exc)
            message = redact_uri(f"{type(exc).__name__}: {exc}")  # e.g. a storage URL in a connection error
            self._finish_quietly("FAILED", {TAG_ERROR: message[:MAX_TAG_LENGTH]})
            raise
        self.finish("FINISHED")

    def _record_error(self, exc: BaseException) -> None:
        """The traceback as an `error.txt` artifact (the tag holds one line)."""
        if self.run_id is None:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "error.txt"
                path.write_text(redact_uri("".join(traceback.format_exception(exc))))
                self.log_artifact(path)
        except Exception as log_exc:  # the run's status matters more than the traceback
            log.warning("could not log the traceback of run %s: %s", self.run_id, log_exc)

    def _finish_quietly(self, status: str, tags: Mapping[str, str]) -> None:
        try:
            self.finish(status, tags)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, first_line(exc))


class MLflowTracker(Tracker):
    def __init__(self, client: RetryingClient, run_id: str, flush_every: int = 50) -> None:
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._pending: list = []
        self._system: Any = None

    def watch_system(self, every_s: float | None) -> None:
        """CPU, memory, disk, network and (with pynvml) per-GPU utilization and memory as `system/*` metrics
        every `every_s` seconds, by MLflow's own SystemMetricsMonitor on a thread (None: off)."""
        if every_s is None:
            return
        # Its INFO lines (started, no GPU, stopped) would print around every trial's own one-line outcome.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=float(every_s),
                resume_logging=self.reopened,
                tracking_uri=self.client.tracking_uri,
            )
            self._system.start()
        except Exception as exc:  # e.g. psutil missing: the trial matters more than its utilization curve
            log.warning("system metrics are off for run %s: %s", self.run_id, first_line(exc))
            self._system = None

    @classmethod
    def start(cls, cfg: DictConfig, attempt_dir: Path | None = None) -> MLflowTracker:
        from mlflow.utils.mlflow_tags import (
            MLFLOW_GIT_COMMIT,
            MLFLOW_PARENT_RUN_ID,
            MLFLOW_SOURCE_NAME,
            MLFLOW_SOURCE_TYPE,
        )

        name = cfg.tracking.experiment_name
        if not name:
            raise TrackingError(f"tracking.experiment_name={name!r} is invalid; allowed: a non-empty name")
        client, artifact_location = open_client(cfg.tracking.uri)
        exp_id = experiment_id(client, str(name), artifact_location)
        tags = {MLFLOW_SOURCE_NAME: "masksweep-train", MLFLOW_SOURCE_TYPE: "LOCAL"}
        commit = git_output("rev-parse", "HEAD")
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        if cfg.trial_name:
            tags[TAG_TRIAL_NAME] = str(cfg.trial_name)
        if cfg.optuna.trial_number is not None:
            tags.update(
                {
                    "optuna.study_name": str(cfg.optuna.study_name),
                    "optuna.trial_number": str(cfg.optuna.trial_number),
                }
            )
        job_num = hydra_job_num()
        if job_num is not None:
            tags["masksweep.job_num"] = str(job_num)
        sweep = sweep_dir()
        if sweep is not None and (sweep / PARENT_RUN_FILE).is_file():
            tags[MLFLOW_PARENT_RUN_ID] = (sweep / PARENT_RUN_FILE).read_text().strip()
        tags.update(_EXTRA_TAGS.get() or {})
        if cfg.trial_name:
            run_name = str(cfg.trial_name)
        elif cfg.optuna.trial_number is not None:
            run_name = f"trial-{cfg.optuna.trial_number}"
        elif job_num is not None:
            run_name = f"job-{job_num}"
        else:
            run_name = _random_run_name()
        if attempt_dir is not None:
            tags[TAG_CHECKPOINT_DIR] = str(attempt_dir.absolute())
        if cfg.optuna.trial_number is not None and attempt_dir is not None:
            study, number = str(cfg.optuna.study_name), int(cfg.optuna.trial_number)
            earlier = _unfinished_run(client, exp_id, study, number, tags[TAG_CHECKPOINT_DIR])
            if earlier is not None:
                return cls._reopen(client, earlier)
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    @classmethod
    def _reopen(cls, client: RetryingClient, run: Any) -> MLflowTracker:
        """A requeued job is the same trial going on: one trial, one run. Its stop tags go, it runs again."""
        for key in run.data.tags:
            if key.startswith("stop.") or key == TAG_ERROR:
                client.delete_tag(run.info.run_id, key)
        restarts = int(run.data.tags.get(TAG_REQUEUES, "0")) + 1
        client.set_tag(run.info.run_id, TAG_REQUEUES, str(restarts))
        client.update_run(run.info.run_id, status="RUNNING")
        log.info("MLflow run %s continues (requeued %d time(s))", run.info.run_id, restarts)
        tracker = cls(client, run.info.run_id)
        tracker.reopened = True
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:  # log_batch takes at most 1000 metrics per call
            batch = self._pending[:1000]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[: len(batch)]

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            items = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        try:
            if self._system is not None:
                system, self._system = self._system, None
                system.finish()  # its last samples go out before the run ends
            self.flush()  # the completed epochs' metrics are recorded whatever the outcome
        finally:
            try:
                self.set_tags(tags or {})
            finally:
                self.client.set_terminated(self.run_id, status)

    def fail_abandoned(self, study_name: str, trial_number: int, retried_as: int) -> None:
        """End FAILED the runs a killed worker left RUNNING for `trial_number` (found by Optuna tags)."""
        from mlflow.entities import RunTag

        experiment = self.client.get_run(self.run_id).info.experiment_id
        for run in self.client.search_runs(
            [experiment], trial_runs_filter(study_name, trial_number, "RUNNING")
        ):
            message = f"its worker died; trial {trial_number} was retried as trial {retried_as}"
            tags = [RunTag(TAG_ERROR, message), RunTag(TAG_RETRIED_AS, str(retried_as))]
            self.client.log_batch(run.info.run_id, tags=tags)
            self.client.set_terminated(run.info.run_id, "FAILED")


UNFINISHED = ("RUNNING", "KILLED", "FAILED")


def _unfinished_run(
    client: RetryingClient, exp_id: str, study_name: str, trial_number: int, attempt_dir: str
) -> Any:
    """The run an earlier attempt of this very job left (KILLED by a requeue's signal, FAILED by SystemExit
    from submitit's requeue, or RUNNING after a SIGKILL): same Optuna trial, same checkpoint directory. A
    retried trial has a new number; another study of the same name (a deleted journal) another directory."""
    same_dir = f" and tags.`{TAG_CHECKPOINT_DIR}` = '{quoted(attempt_dir)}'"
    filters = [trial_runs_filter(study_name, trial_number, status) + same_dir for status in UNFINISHED]
    runs = [run for text in filters for run in client.search_runs([exp_id], text)]
    return max(runs, key=lambda r: r.info.start_time) if runs else None


def _random_run_name() -> str:
    """An MLflow-style name ("bright-owl-123") drawn without touching the seeded global `random` state.

    MLflow's own default name draws from it: every run of a seed would get the same name, and the trial's
    random stream would shift with tracking on or off."""
    from mlflow.utils.name_utils import _generate_random_name

    state = random.getstate()
    try:
        random.seed()  # from OS entropy
        return _generate_random_name()
    except Exception:
        return f"run-{os.urandom(4).hex()}"
    finally:
        random.setstate(state)


def checkpoint_dir_of_run(
    cfg: DictConfig, run_id: str, name: str | None = None, option: str = TRAIN_OPTION
) -> Path:
    """The checkpoint directory a logged run recorded (tag masksweep.checkpoint_dir), for `resume=RUN_ID` or
    `masksweep predict --run RUN_ID`. `run_id` may be a unique prefix (`find_run`); `name` is how the user
    gave it (default `resume='...'`) and `option` how they name the store (`check_store`)."""
    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    name = name or f"resume={run_id!r}"
    what = f"{name} is neither a checkpoint file, a run directory nor an MLflow run"
    try:
        client, _ = open_client(uri, create=False, option=option)
    except TrackingError as exc:
        raise TrackingError(f"{what} ({exc})") from exc
    try:
        run = find_run(client, run_id, name)
    except RunNotFound as exc:
        raise TrackingError(
            f"{what} in {redact_uri(client.tracking_uri)}; allowed: a checkpoint file, a run directory, "
            f"a run id or a unique prefix of {MIN_PREFIX} or more hex digits"
        ) from exc
    directory = run.data.tags.get(TAG_CHECKPOINT_DIR)
    if not directory:
        raise TrackingError(
            f"{name}: the MLflow run {run.info.run_id} recorded no checkpoint directory "
            f"(tag {TAG_CHECKPOINT_DIR})"
        )
    return Path(directory)


def start_tracker(cfg: DictConfig, attempt_dir: Path | None = None) -> Tracker:
    """The trial's run; `attempt_dir` (its checkpoint directory) tells a requeued job's own run apart."""
    if not cfg.tracking.enabled:
        return Tracker()
    tracker = MLflowTracker.start(cfg, attempt_dir)
    tracker.watch_system(cfg.tracking.get("system_metrics_every_s"))
    return tracker


def log_run_inputs(tracker: Tracker, cfg: DictConfig, extra_params: Mapping[str, str]) -> None:
    """Params (flattened resolved config + provenance) and the config itself (secrets masked) as artifacts."""
    if tracker.run_id is None:
        return
    tracker.log_params({**config_params(cfg), **provenance(), **extra_params})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        OmegaConf.save(redacted_config(cfg), path)
        tracker.log_artifact(path)
        hydra_dir = hydra_output_dir()
        if hydra_dir is not None and hydra_dir.is_dir():
            tracker.log_artifact(redacted_hydra_dir(hydra_dir, Path(tmp) / ".hydra"), ".hydra")
