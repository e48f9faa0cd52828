"""A multirun's MLflow parent run; its trials nest under it (they find it through a file in the sweep dir).

- masksweep's Optuna sweeper: one parent per *study*, whatever the faults and however many workers.
  `StudyParent.open` finds it in the study's registry (`masksweep.study.registry`) or creates it there with a
  compare-and-set, so workers started together, and a rerun after a kill, share it; the worker that sees
  the study done ends it FINISHED and logs the study's one summary; a worker that stops early leaves it to
  the live ones, or ends it FAILED / KILLED when it is the last.
- Any other sweeper (Hydra's basic one): `SweepRunCallback` makes one parent per multirun.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from masksweep.errors import MasksweepError
from masksweep.tracking.params import MAX_PARAM_LENGTH, flatten
from masksweep.tracking.runs import trial_runs_filter
from masksweep.tracking.store import RetryingClient, experiment_id, first_line, open_client, redact_uri
from masksweep.tracking.tags import PARENT_RUN_FILE, SWEEP_RESULTS_FILE, TAG_ERROR, TAG_ROLE

if TYPE_CHECKING:
    from masksweep.study.registry import StudyRegistry

log = logging.getLogger(__name__)

TAG_STUDY = "optuna.study_name"
TAG_STORAGE = "optuna.storage"  # the study's storage as optuna-dashboard takes it (password masked)
# The sweeper config key through which a sweeper says it keeps its own, study-wide parent run.
STUDY_PARENT_KEY = "hydra.sweeper.study_parent_run"


def sweeper_keeps_parent(config: DictConfig) -> bool:
    return bool(OmegaConf.select(config, STUDY_PARENT_KEY, default=False))


def _create_run(
    client: RetryingClient,
    exp_id: str,
    config: DictConfig,
    sweep: Path,
    study: str | None,
    storage: str | None,
) -> str:
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

    tags = {"masksweep.sweep_dir": str(sweep), TAG_ROLE: "sweep", MLFLOW_SOURCE_NAME: "masksweep-train -m"}
    if study:
        tags[TAG_STUDY] = str(study)
    if storage:
        tags[TAG_STORAGE] = redact_uri(storage)
    run = client.create_run(exp_id, run_name=f"sweep-{study or sweep.name}", tags=tags)
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    client.log_batch(
        run.info.run_id,
        params=[
            Param("sweep.overrides", redact_uri(" ".join(map(str, overrides)))[:MAX_PARAM_LENGTH]),
            Param("optimized_metric", str(OmegaConf.select(config, "optimized_metric", default=""))),
        ],
    )
    return run.info.run_id


def log_summary(client: RetryingClient, run_id: str, results_dir: Path) -> None:
    """optimization_results.yaml's numbers as metrics, the file itself and the plots as artifacts."""
    try:
        results = results_dir / SWEEP_RESULTS_FILE
        if results.is_file():
            summary = OmegaConf.to_container(OmegaConf.load(results), resolve=True)
            numbers = {k: v for k, v in flatten(summary).items() if _is_number(v)}
            metrics = [_metric(k, float(v)) for k, v in numbers.items()]
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
            study = summary.get("study_name") if isinstance(summary, dict) else None
            if study:
                client.set_tag(run_id, TAG_STUDY, str(study))
            with tempfile.TemporaryDirectory() as tmp:  # its `storage:` may be a URL with a password
                copy = Path(tmp) / results.name
                copy.write_text(redact_uri(results.read_text()))
                client.log_artifact(run_id, str(copy))
        for plot in sorted(results_dir.glob("*.png")) + sorted(results_dir.glob("*.html")):
            client.log_artifact(run_id, str(plot), "plots")
    except Exception as exc:  # the trials are recorded; a failing summary must not fail the sweep
        log.warning("could not log the sweep summary to MLflow run %s: %s", run_id, first_line(exc))


class StudyParent:
    """The MLflow parent run of one Optuna study, registered in the study (see the module docstring)."""

    def __init__(self, client: RetryingClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def open(
        cls,
        config: DictConfig,
        registry: StudyRegistry,
        study_name: str,
        storage: str,
        sweep: Path,
        others_live: bool,
    ) -> StudyParent | None:
        """Adopt the study's parent run or create it; None when tracking is off. Raises MasksweepError."""
        from mlflow.exceptions import MlflowException

        from masksweep.study.registry import parent_key

        if not OmegaConf.select(config, "tracking.enabled", default=False):
            return None
        client, artifact_location = open_client(config.tracking.uri)
        name = str(config.tracking.experiment_name)
        exp_id = experiment_id(client, name, artifact_location)
        sweep = sweep.absolute()

        def make() -> dict[str, Any]:
            run_id = _create_run(client, exp_id, config, sweep, study_name, storage)
            return {"run_id": run_id, "experiment_id": exp_id}

        def unusable(record: Any) -> bool:  # deleted in the UI, or a store that was wiped
            try:
                return client.get_run(str(record["run_id"])).info.lifecycle_stage == "deleted"
            except (MlflowException, KeyError, TypeError):
                return True

        record, made = registry.claim(
            parent_key(redact_uri(client.tracking_uri), name),
            make,
            undo=lambda mine: client.delete_run(mine["run_id"]),
            replace=unusable,
        )
        parent = cls(client, str(record["run_id"]))
        if made:
            log.info("study %s: MLflow parent run %s", study_name, parent.run_id)
        else:
            status = client.get_run(parent.run_id).info.status
            if status == "RUNNING" and not others_live:
                log.warning(
                    "study %s: its MLflow parent run %s was left RUNNING by a dead worker; adopting it",
                    study_name,
                    parent.run_id,
                )
            else:
                log.info("study %s: joining its MLflow parent run %s (%s)", study_name, parent.run_id, status)
            if status != "RUNNING":
                client.update_run(parent.run_id, status="RUNNING")
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / PARENT_RUN_FILE).write_text(parent.run_id)
        return parent

    def trial_run_id(self, study_name: str, trial_number: int) -> str | None:
        """The FINISHED run of the study's trial `trial_number` (found by its Optuna tags), if any."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        query = trial_runs_filter(study_name, trial_number, "FINISHED")
        runs = self.client.search_runs(
            [experiment], query, max_results=1, order_by=["attributes.end_time DESC"]
        )
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.client.log_batch(self.run_id, metrics=[_metric(k, float(v)) for k, v in metrics.items()])

    def finish(self, results_dir: Path | None) -> None:
        """The study is done: its summary (when this worker wrote it) and FINISHED."""
        if results_dir is not None:
            log_summary(self.client, self.run_id, results_dir)
        self.client.set_terminated(self.run_id, "FINISHED")

    def stop(self, status: str, why: str) -> None:
        """The last live worker stopped before the study was done; a rerun adopts the run again."""
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, TAG_ERROR, why[:5000])
            self.client.set_terminated(self.run_id, status)


class SweepRunCallback(Callback):
    """Hydra callback: a multirun is an MLflow parent run (for sweepers that keep none of their own).

    A sweep that dies before Hydra's `on_multirun_end` leaves its parent FAILED, not RUNNING (an exit hook).
    """

    def __init__(self) -> None:
        self.client: RetryingClient | None = None
        self.run_id: str | None = None
        self._pid = os.getpid()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not OmegaConf.select(config, "tracking.enabled", default=False) or sweeper_keeps_parent(config):
            return
        try:
            self._start(config)
        except MasksweepError as exc:
            # Hydra would print a traceback for an error in a callback; the user gets the one line.
            import sys

            print(f"masksweep-train: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    def _start(self, config: DictConfig) -> None:
        self.client, artifact_location = open_client(config.tracking.uri)
        exp_id = experiment_id(self.client, config.tracking.experiment_name, artifact_location)
        sweep = Path(config.hydra.sweep.dir).absolute()
        self.run_id = _create_run(self.client, exp_id, config, sweep, None, None)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / PARENT_RUN_FILE).write_text(self.run_id)
        atexit.register(self._end_unfinished)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        log_summary(self.client, self.run_id, Path(config.hydra.sweep.dir).absolute())
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def _end_unfinished(self) -> None:
        if self.run_id is None or self.client is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, TAG_ERROR, "the sweep ended before Hydra's on_multirun_end")
            self.client.set_terminated(self.run_id, "FAILED")
        self.run_id = None

    def __getstate__(self) -> dict[str, Any]:
        # Process launchers pickle Hydra's callbacks into every job; a job never touches the parent run.
        return {"client": None, "run_id": None, "_pid": self._pid}


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return value not in ("True", "False")


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)
