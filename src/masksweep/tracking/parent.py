"""A multirun's MLflow parent run, as a Hydra callback; its trials nest under it."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from masksweep.errors import MasksweepError
from masksweep.tracking.params import MAX_PARAM_LENGTH, flatten
from masksweep.tracking.store import (
    RetryingClient,
    experiment_id,
    file_lock,
    first_line,
    open_client,
    redact_uri,
    sqlite_path,
)
from masksweep.tracking.tags import PARENT_RUN_FILE, SWEEP_RESULTS_FILE, TAG_ERROR, TAG_ROLE

log = logging.getLogger(__name__)


class SweepRunCallback(Callback):
    """Hydra callback: a multirun is an MLflow parent run; its trials find it through a file in the sweep dir.

    A sweep that dies before Hydra's `on_multirun_end` leaves its parent FAILED, not RUNNING (an exit hook).
    """

    def __init__(self) -> None:
        self.client: RetryingClient | None = None
        self.run_id: str | None = None
        self._pid = os.getpid()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not OmegaConf.select(config, "tracking.enabled", default=False):
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
        study = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
        db_path = sqlite_path(self.client.tracking_uri)
        # Workers started together on one study must find one parent, not each create their own: on the
        # embedded store a file lock makes find-or-create atomic.
        with file_lock(db_path.parent / ".sweep-parent.lock") if db_path else contextlib.nullcontext():
            self._find_or_create_parent(config, exp_id, sweep, study)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / PARENT_RUN_FILE).write_text(self.run_id)
        atexit.register(self._end_unfinished)

    def _find_or_create_parent(self, config: DictConfig, exp_id: str, sweep: Path, study: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

        assert self.client is not None
        self.run_id = self._resumable_parent(exp_id, study) if study else None
        if self.run_id is None:
            tags = {
                "masksweep.sweep_dir": str(sweep),
                TAG_ROLE: "sweep",
                MLFLOW_SOURCE_NAME: "masksweep-train -m",
            }
            if study:
                tags["optuna.study_name"] = str(study)
            run = self.client.create_run(exp_id, run_name=f"sweep-{study or sweep.name}", tags=tags)
            self.run_id = run.info.run_id
            overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
            self.client.log_batch(
                self.run_id,
                params=[
                    Param("sweep.overrides", redact_uri(" ".join(map(str, overrides)))[:MAX_PARAM_LENGTH]),
                    Param("optimized_metric", str(OmegaConf.select(config, "optimized_metric", default=""))),
                ],
            )
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _resumable_parent(self, exp_id: str, study: str) -> str | None:
        # Re-running an Optuna sweep continues its study, so it continues the same parent run too.
        assert self.client is not None
        quoted = str(study).replace("\\", "\\\\").replace("'", "\\'")
        runs = self.client.search_runs(
            [exp_id],
            f"tags.`optuna.study_name` = '{quoted}' and tags.`{TAG_ROLE}` = 'sweep'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        sweep = Path(config.hydra.sweep.dir).absolute()
        try:
            results = sweep / SWEEP_RESULTS_FILE
            if results.is_file():
                summary = OmegaConf.to_container(OmegaConf.load(results), resolve=True)
                numbers = {k: v for k, v in flatten(summary).items() if _is_number(v)}
                metrics = [_metric(k, float(v)) for k, v in numbers.items()]
                for i in range(0, len(metrics), 1000):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
                study = summary.get("study_name") if isinstance(summary, dict) else None
                if study:
                    self.client.set_tag(self.run_id, "optuna.study_name", str(study))
                with tempfile.TemporaryDirectory() as tmp:  # its `storage:` may be a URL with a password
                    copy = Path(tmp) / results.name
                    copy.write_text(redact_uri(results.read_text()))
                    self.client.log_artifact(self.run_id, str(copy))
            for plot in sorted(sweep.glob("*.png")) + sorted(sweep.glob("*.html")):
                self.client.log_artifact(self.run_id, str(plot), "plots")
        except Exception as exc:  # the trials are recorded; a failing summary must not fail the sweep
            log.warning("could not log the sweep summary to MLflow run %s: %s", self.run_id, first_line(exc))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def _end_unfinished(self) -> None:
        if self.run_id is None or self.client is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, TAG_ERROR, "the sweep ended before Hydra's on_multirun_end")
            self.client.set_terminated(self.run_id, "FAILED")
        self.run_id = None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return value not in ("True", "False")


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)
