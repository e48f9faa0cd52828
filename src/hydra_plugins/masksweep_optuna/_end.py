"""A worker leaves the study: when the study is done, one worker writes its summary (counts, compute, best
trial, plots), scores the best trial on the held-out test split and ends the MLflow parent run; otherwise the
live workers carry on and the last one ends the parent."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from omegaconf import DictConfig, OmegaConf

from masksweep.study.compute import SLOTS_ATTR_PREFIX, SlotClock, study_compute
from masksweep.study.heartbeat import WorkerIdentity
from masksweep.study.registry import SUMMARY_ATTR, StudyRegistry
from masksweep.tracking.parent import StudyParent
from masksweep.tracking.store import first_line

from ._budget import Budget
from ._outcomes import interrupted
from ._results import count_trials, save_plots, summarize, trial_label, write_results
from ._settings import FailureRateExceeded
from ._space import SearchSpace

if TYPE_CHECKING:
    from hydra.types import HydraContext

log = logging.getLogger(__name__)

TRIAL_NAME_ATTR = "trial_name"


@dataclass
class StudyEnd:
    study: optuna.Study
    budget: Budget
    registry: StudyRegistry
    me: WorkerIdentity
    parent: StudyParent | None
    study_dir: Path
    storage: str  # described, for the results file
    grace_period: float
    direction: str
    hydra_context: HydraContext
    config: DictConfig
    space: SearchSpace

    def leave(self, error: BaseException | None, launched: bool, clock: SlotClock) -> None:
        """This worker leaves (its slot record first). Never raises: the trials are already recorded."""
        try:
            self.registry.set(SLOTS_ATTR_PREFIX + self.me.id, clock.record())
            self.registry.leave(self.me)
            trials = self.study.get_trials(deepcopy=False)
            done = self.budget.done(trials)
            last = not self.registry.live_workers(self.me, self.grace_period)
            if not done and not last:
                log.info("this worker stops; the study goes on with its other live workers")
                return
            if not done and not launched:
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
                    self.parent.stop(
                        kind, first_line(f"the study stopped before n_trials: {error or status}")
                    )
        except Exception as exc:  # never hide the sweep's own outcome behind a reporting problem
            log.warning("could not end the study's records: %s", first_line(exc))

    def compute(self) -> dict[str, float]:
        attrs = self.registry.storage.get_study_system_attrs(self.registry.study_id)
        slots = [v for k, v in attrs.items() if k.startswith(SLOTS_ATTR_PREFIX) and isinstance(v, dict)]
        return study_compute(self.study.get_trials(deepcopy=False), slots)

    def _write_summary(self, status: str, message: str | None) -> None:
        try:
            summarize(self.study, self.budget.n_trials)
            compute = self.compute()
            log.info(
                "study %s compute: %.4g device-hours spent, %.4g saved by pruning and divergence%s",
                self.study.study_name,
                compute["device_hours"],
                compute["saved_device_hours"],
                f", slot utilization {compute['slot_utilization']:.2f}"
                if "slot_utilization" in compute
                else "",
            )
            write_results(
                self.study,
                self.study_dir,
                storage=self.storage,
                n_trials=self.budget.n_trials,
                direction=self.direction,
                status=status,
                message=message,
                plots=save_plots(self.study, self.study_dir),
                compute=compute,
            )
        except Exception:
            log.exception("could not write the sweep results to %s", self.study_dir)

    def _score_best_on_test(self) -> None:
        """The study's best trial (by the optimized val metric), scored once on the held-out test split when
        its config has one (`data.test`): `test/*` on the trial's run and on the parent. The study is done
        by now, so no pruning or selection can read these numbers. A failure here is logged, never raised:
        the study's trials are already recorded."""
        assert self.parent is not None
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
            log.warning("could not score %s on the test split: %s", label, first_line(exc))
            return
        log.info(
            "study %s: best trial %s on the held-out test split: %s",
            self.study.study_name,
            label,
            "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("ap_bbox", "ap_segm", "iou_global"))
            ),
        )
