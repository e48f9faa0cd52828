"""`masksweep-train`: one Mask R-CNN trial, composed by Hydra. `train(cfg)` is the testable core."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from masksweep import distributed, engine
from masksweep.configs import CONFIG_NAME, CONFIG_PATH
from masksweep.errors import ConfigError, MasksweepError, TrialStopped
from masksweep.interrupts import Interrupted, signals_raise
from masksweep.study.compute import COMPUTE_ATTR, ComputeClock, trial_compute
from masksweep.tracking.tags import TAG_EVAL_IMAGES
from masksweep.validation import validate

log = logging.getLogger(__name__)

# The Optuna user attr where a sweep trial records its checkpoint directory, for a retry to resume from.
CHECKPOINT_DIR_ATTR = "checkpoint_dir"
# trainer.ddp_timeout_s of a config logged before it existed (`masksweep reproduce`).
DDP_TIMEOUT_S = 1800.0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; the returned generator drives DataLoader shuffling and worker seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; carry that seed over to Python and NumPy.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The torch device for `name` (auto = cuda if available), checked now: a device this machine lacks is
    one line naming `key` (the option the user set), not a torch traceback at the first tensor."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, name, "auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(key, name, "auto or cpu (this machine has no CUDA GPU that torch can use)")
        if device.index is not None and device.index >= count:
            raise ConfigError(key, name, f"cuda:0 ... cuda:{count - 1} (this machine has {count} GPUs)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, name, "auto or cpu (MPS is not available on this machine)")
    return device


def make_loader(
    dataset, cfg: DictConfig, train: bool, generator: torch.Generator
) -> torch.utils.data.DataLoader:
    from masksweep import distributed
    from masksweep.data import collate

    workers = cfg.trainer.num_workers
    sampler = distributed.sampler(dataset, train, cfg.seed)  # this rank's share in a DDP trial, else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.trainer.batch_size,  # per process, as in torchvision's reference
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=workers > 0,  # re-forking workers every epoch costs seconds per epoch
        pin_memory=torch.cuda.is_available(),
    )


@dataclass
class TrialState:
    """What a checkpoint restores besides the modules: where the trial is and what it has seen."""

    epoch: int = 0
    global_step: int = 0
    best: float = -math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0  # over every attempt (a requeue or a retry resumes the count)
    device_s: float = 0.0  # GPU-seconds on GPUs, core-seconds on the CPU (masksweep.study.compute)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """The trial's run directory (Hydra's output dir), unless checkpoint.dir says otherwise."""
    from masksweep.tracking import hydra_output_dir

    if cfg.checkpoint.dir is not None:
        return Path(cfg.checkpoint.dir)
    hydra_dir = hydra_output_dir()
    if hydra_dir is not None:
        return hydra_dir.parent / "checkpoints"
    return Path.cwd() / "checkpoints" / time.strftime("%Y%m%d-%H%M%S") / str(os.getpid())


def resume_path(resume: str, cfg: DictConfig) -> Path:
    """`resume` is a checkpoint file, a run directory holding last.pt, or an MLflow run id."""
    from masksweep.checkpoint import LAST

    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        return path / LAST if (path / LAST).is_file() else path / "checkpoints" / LAST
    from masksweep.tracking import checkpoint_dir_of_run

    return checkpoint_dir_of_run(cfg, resume) / LAST


def requeued_checkpoint(directory: Path, in_sweep: bool) -> Path | None:
    """A sweep trial whose job was requeued (a SLURM time limit, preemption, `scontrol requeue`) runs again
    with the same trial number, so the same directory: its own last.pt is where it stopped. Outside a sweep a
    run directory is new each time, and resuming is asked for with `resume=`."""
    from masksweep.checkpoint import LAST

    if not in_sweep or not (directory / LAST).is_file():
        return None
    log.info("Requeued: resuming the trial from its own last checkpoint in %s", directory)
    return directory / LAST


def attempt_checkpoint(previous: tuple[int, dict] | None) -> Path | None:
    """For a sweep trial retried after its worker died: the last checkpoint of the attempt that died, so a
    kill costs at most one epoch."""
    from masksweep.checkpoint import LAST

    directory = previous[1].get(CHECKPOINT_DIR_ATTR) if previous else None
    if directory is None or not (Path(directory) / LAST).is_file():
        return None
    log.info("Retrying trial %d: resuming from its last checkpoint in %s", previous[0], directory)
    return Path(directory) / LAST


@dataclass
class Plan:
    """What the checks before any heavy work found; the trial is set up from it."""

    device: torch.device
    model_cfg: dict[str, Any]
    checkpoints: Any  # masksweep.checkpoint.CheckpointManager (imported lazily)
    reporter: Any = None  # masksweep.study.TrialReporter in a sweep, else None
    previous: tuple[int, dict] | None = None  # the attempt of this trial that died, if any
    resume_from: Path | None = None
    saved: dict[str, Any] | None = None  # the checkpoint resumed from


def preflight(cfg: DictConfig) -> Plan:
    """Every check that can fail on the user's input, before data is built, weights are loaded or
    pretraining starts (minutes of work lost to a typo otherwise): the config values, the device, the
    tracking store (reachable, and a SQLite file's directory), the Optuna storage of a sweep, the checkpoint
    to resume from and the model weights file."""
    from omegaconf import OmegaConf

    from masksweep import checkpoint
    from masksweep.tracking import check_store

    validate(cfg)
    device = resolve_device(str(cfg.device))
    if cfg.tracking.enabled:
        check_store(cfg.tracking.uri)
    reporter = None
    if cfg.optuna.trial_number is not None:
        from masksweep.study import TrialReporter

        reporter = TrialReporter.from_config(cfg.optuna)
    checkpoints = checkpoint.CheckpointManager(checkpoint_dir(cfg), cfg.checkpoint.keep)
    previous = reporter.previous_attempt() if reporter is not None else None
    resume_from = (
        resume_path(str(cfg.resume), cfg)
        if cfg.resume is not None
        else requeued_checkpoint(checkpoints.directory, reporter is not None) or attempt_checkpoint(previous)
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    saved = checkpoint.load(resume_from) if resume_from is not None else None
    if saved is not None:
        checkpoint.check_compatible(saved, model_cfg, resume_from)
        # A finished trial keeps weights only; that is enough to redo its end (a kill after the last epoch)
        # but not to train on.
        if "optimizer" not in saved and saved["progress"]["epoch"] < cfg.epochs:
            raise ConfigError(
                "resume",
                str(resume_from),
                "the last.pt of an unfinished trial (a finished trial keeps its weights only)",
            )
        model_cfg["pretrain"] = None  # the checkpoint holds the weights; no need to pretrain or load again
    _check_weights(model_cfg)
    return Plan(device, model_cfg, checkpoints, reporter, previous, resume_from, saved)


def _check_weights(model_cfg: dict[str, Any]) -> None:
    """A weights name torchvision lacks, or a weights file that is not there (nothing is read or fetched)."""
    weights = model_cfg.get("weights")
    if weights is None:
        return
    from masksweep.model import resolve_weights

    found = resolve_weights(model_cfg["arch"], str(weights))
    if found.path is not None and not found.path.is_file():
        raise ConfigError(
            "model.weights", str(weights), "an existing checkpoint file or a torchvision weights name"
        )


def instantiate_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(model_cfg)
    except InstantiationException as exc:
        # Hydra wraps the builder's error in "Error in call to target ..."; ours is already the one line.
        if isinstance(exc.__cause__, MasksweepError):
            raise exc.__cause__ from None
        raise


class Trial:
    """One trial's objects: built by the constructor, advanced by `run_epoch`, closed by `finish`.

    train() is: preflight (checks only) -> Trial(...) (seed, data, model, optimizer, restored state) -> inside
    the tracker's run: begin, run_epoch per epoch, finish."""

    def __init__(self, cfg: DictConfig, plan: Plan) -> None:
        """Seed, build the data, the model and the optimizer, and restore a resumed trial's state. The order
        of what draws random numbers is fixed: a seed gives the same trial to the last digit."""
        from masksweep import checkpoint
        from masksweep.artifacts import OverlaySamples
        from masksweep.data import build_datasets, ground_truth
        from masksweep.divergence import DivergenceDetector
        from masksweep.metrics import COCOEvaluator
        from masksweep.optim import build_optimizer, build_scheduler, build_warmup
        from masksweep.tracking import Tracker, start_tracker

        self.cfg, self.plan, self.device = cfg, plan, plan.device
        self.checkpoints, self.reporter = plan.checkpoints, plan.reporter
        self.world = distributed.world()
        self.generator = seed_everything(cfg.seed)
        datasets = build_datasets(cfg.data)  # .test (if any) is only for `masksweep evaluate --split test`
        self.train_set = datasets.train
        self.train_loader = make_loader(datasets.train, cfg, train=True, generator=self.generator)
        self.val_loader = make_loader(datasets.val, cfg, train=False, generator=self.generator)

        model = instantiate_model(plan.model_cfg).to(self.device)
        if cfg.trainer.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer)
        self.warmup = build_warmup(cfg.scheduler, self.optimizer)
        amp_dtype = engine.resolve_amp(cfg.trainer.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        self.detector = DivergenceDetector(**cfg.divergence)
        self.stateful = {
            "model": model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "warmup": self.warmup,
            "scaler": self.scaler,
            "divergence": self.detector,
        }
        self.state = TrialState()
        if plan.saved is not None:
            for key, module in self.stateful.items():
                if module is not None and key in plan.saved:
                    module.load_state_dict(plan.saved[key])
            if "rng" in plan.saved:
                checkpoint.restore_rng(plan.saved["rng"], self.generator)
            self.state = TrialState(**plan.saved["progress"])
            log.info("Resuming from %s after epoch %d", plan.resume_from, self.state.epoch)
        self.resumed_after_the_last_epoch = self.state.epoch >= cfg.epochs

        self.evaluator = COCOEvaluator(
            cfg.eval.backend, cfg.eval.score_threshold, cfg.eval.mask_threshold, ground_truth(datasets.val)
        )
        self.options = engine.StepOptions(
            grad_clip_norm=cfg.trainer.grad_clip_norm,
            amp_dtype=amp_dtype,
            log_every=cfg.trainer.log_every_n_steps,
            limit_batches=cfg.trainer.limit_train_batches,
            progress=cfg.trainer.progress,
            # .get: a config logged before these keys existed (`masksweep reproduce`) replays as it ran.
            progress_every_s=cfg.trainer.get("progress_every_s", engine.DEFAULT_EVERY_S),
            progress_every_n=cfg.trainer.get("progress_every_n_steps"),
        )
        # One trial, one record: only rank 0 of a DDP trial has an MLflow run (and draws its overlays).
        self.tracker = start_tracker(cfg, self.checkpoints.directory) if self.world.main else Tracker()
        # The val overlays are drawn from the last epoch's evaluation, not from a second pass of the model.
        drawn = cfg.tracking.enabled and self.world.main
        self.overlays = OverlaySamples(cfg.tracking.num_overlays if drawn else 0)
        self.clock = ComputeClock(self.device.type, self.world.size)
        # Wrapped once the resumed weights are in: DDP starts every rank from rank 0's.
        self.train_model = distributed.wrap(model, self.device)

    def epochs(self) -> range:
        return range(self.state.epoch + 1, self.cfg.epochs + 1)

    def begin(self) -> None:
        """The run's inputs and tags, and a resumed run's curve so far."""
        from masksweep.data import dataset_fingerprint
        from masksweep.study.jobs import job_tags
        from masksweep.tracking import log_run_inputs

        cfg, tracker, directory = self.cfg, self.tracker, str(self.checkpoints.directory.absolute())
        # A reopened run (a requeued job) keeps its first attempt's params: MLflow refuses a changed value,
        # and the code's provenance (git.commit) may have moved on while the job waited in the queue.
        if not tracker.reopened:
            extra = {"data.fingerprint": dataset_fingerprint(self.train_set)}
            log_run_inputs(tracker, cfg, {**extra, "world_size": str(self.world.size)})
        if self.reporter is not None:
            self.reporter.set_user_attr(CHECKPOINT_DIR_ATTR, directory)
        if self.plan.previous is not None:  # the dead attempt could not end its own run
            tracker.fail_abandoned(cfg.optuna.study_name, self.plan.previous[0], self.reporter.number)
        resumed = self.plan.resume_from
        tracker.set_tags(
            {
                "masksweep.checkpoint_dir": directory,
                **({"masksweep.resumed_from": str(resumed)} if resumed else {}),
                **job_tags(),  # where it runs: SLURM job id, node, requeue count, log file
            }
        )
        if not tracker.reopened:  # a resumed run carries the whole curve (a reopened one has it already)
            for row in self.state.history:
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        if self.reporter is not None and self.state.history:  # its Optuna trial too (the pruner may act)
            self.reporter.resume({int(r["epoch"]): r[cfg.optimized_metric] for r in self.state.history})

    def run_epoch(self, epoch: int) -> None:
        """Train, evaluate, record, checkpoint, and report to the sweep (which may prune)."""
        from masksweep.data import dropped_while_reading

        cfg, state = self.cfg, self.state
        tic = time.perf_counter()
        distributed.set_epoch(self.train_loader, epoch)
        try:
            means, steps_end = engine.train_one_epoch(
                self.train_model,
                self.optimizer,
                self.train_loader,
                self.device,
                epoch,
                state.global_step,
                self.detector,
                self.options,
                warmup=self.warmup,
                scaler=self.scaler,
                on_log=self._log_step,
            )
        except TrialStopped as stop:
            if cfg.divergence.action == "fail":
                raise MasksweepError(f"trial diverged at step {stop.step}: {stop.reason}") from stop
            raise
        seconds = time.perf_counter() - tic
        distributed.sync_buffers(self.model)  # evaluate and checkpoint the one model: rank 0's
        images = (steps_end - state.global_step) * cfg.trainer.batch_size * self.world.size
        if self.scheduler is not None:
            self.scheduler.step()
        val = self._evaluate(self.overlays if epoch == cfg.epochs else None)
        # The evaluator counts the images it scored: fewer than the split when limit_val_batches cut it short.
        scored, total = len(self.evaluator.image_ids), len(self.val_loader.dataset)
        self.tracker.set_tags({TAG_EVAL_IMAGES: f"{scored} of {total}"})
        row = {
            "epoch": epoch,
            **{f"train/epoch_{k}": v for k, v in means.items()},
            **{f"val/{k}": v for k, v in val.items()},
            "time/epoch_seconds": seconds,
            "time/images_per_second": images / seconds,
            "data/dropped_images": float(dropped_while_reading(self.train_set)),
        }
        improved = row[cfg.optimized_metric] > state.best
        wall_s, device_s = self.clock.lap()
        self.state = TrialState(
            epoch,
            steps_end,
            max(state.best, row[cfg.optimized_metric]),
            [*state.history, row],
            state.wall_s + wall_s,
            state.device_s + device_s,
        )
        self._record_compute(epoch, self.state.wall_s, self.state.device_s)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        self.tracker.flush()
        if self.world.main:  # every rank holds the same weights; one writes them
            self.checkpoints.save(self._checkpoint(), improved, final=epoch == cfg.epochs)
        log.info(
            "epoch %d/%d  loss %.4f  AP bbox %.3f  AP segm %.3f  IoU %.3f  (%.1fs)%s",
            epoch,
            cfg.epochs,
            means["loss"],
            val["ap_bbox"],
            val["ap_segm"],
            val["iou_global"],
            seconds,
            subset_note(scored, total, cfg.trainer.limit_val_batches),
        )
        with distributed.stop_together():  # rank 0's pruner decides for every rank
            if self.reporter is not None:
                self.reporter.report(row[cfg.optimized_metric], epoch)

    @contextmanager
    def accounting(self) -> Iterator[None]:
        """A trial that stops (pruned, diverged, failed, killed) still records what it spent; a divergence
        mid-epoch counts the part of the epoch it trained."""
        from masksweep.errors import TrialDiverged

        try:
            yield
        except BaseException as stop:
            wall_s, device_s = self.clock.lap()
            steps = max(1, self.steps_per_epoch)
            partial = (stop.step - self.state.global_step) / steps if isinstance(stop, TrialDiverged) else 0.0
            done = self.state.epoch + min(1.0, max(0.0, float(partial)))
            try:
                self._record_compute(done, self.state.wall_s + wall_s, self.state.device_s + device_s)
            except Exception as exc:  # the stop matters more than its bookkeeping
                log.warning("could not record the trial's compute: %s", exc)
            raise

    @property
    def steps_per_epoch(self) -> int:
        limit = self.cfg.trainer.limit_train_batches
        return len(self.train_loader) if limit is None else min(len(self.train_loader), int(limit))

    def _record_compute(self, epochs_done: float, wall_s: float, device_s: float) -> None:
        """Wall time and device-seconds so far, on the run and on the Optuna trial (the study's compute)."""
        step = max(1, math.ceil(epochs_done))
        self.tracker.log_metrics({"time/wall_seconds": wall_s, "time/device_seconds": device_s}, step=step)
        if self.reporter is not None:
            compute = trial_compute(
                self.device.type, self.world.size, wall_s, device_s, self.cfg.epochs, epochs_done
            )
            self.reporter.set_user_attr(COMPUTE_ATTR, compute)

    def _log_step(self, step: int, values: dict[str, float]) -> None:
        self.tracker.log_metrics({f"train/{k}": v for k, v in values.items()}, step)

    def _evaluate(self, on_batch: Any = None) -> dict[str, float]:
        return engine.evaluate(
            self.model,
            self.val_loader,
            self.device,
            self.evaluator,
            self.cfg.trainer.limit_val_batches,
            progress=self.options.progress,
            on_batch=on_batch,
            progress_every_n=self.options.progress_every_n,
        )

    def _checkpoint(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from masksweep import checkpoint
        from masksweep.tracking import redacted_config

        return {
            **{k: m.state_dict() for k, m in self.stateful.items() if m is not None},
            "rng": checkpoint.rng_state(self.generator),
            "progress": asdict(self.state),
            "model_config": model_cfg_without_pretrain(self.plan.model_cfg),
            "config": OmegaConf.to_yaml(redacted_config(self.cfg)),
        }

    def finish(self) -> dict[str, float]:
        """The final metrics, the last checkpoint on disk, and the run's artifacts."""
        from masksweep.artifacts import save_curves, save_overlays
        from masksweep.metrics import scored_ids_file

        cfg, tracker, checkpoints, evaluator = self.cfg, self.tracker, self.checkpoints, self.evaluator
        last = self.state.history[-1]
        final = {
            "final/loss_last_epoch": last["train/epoch_loss"],
            "final/loss_classifier_last_epoch": last["train/epoch_loss_classifier"],
            f"final/best_{cfg.optimized_metric.removeprefix('val/')}": self.state.best,
            **{k: v for k, v in last.items() if k.startswith("val/")},
        }
        tracker.log_metrics({k: v for k, v in final.items() if k.startswith("final/")}, step=cfg.epochs)
        if self.resumed_after_the_last_epoch and (cfg.tracking.enabled or cfg.eval.export_predictions):
            self._evaluate(self.overlays)  # no evaluation ran in this process to draw from or to export
        if not self.world.main:  # rank 0 writes the files and records the run
            return final
        checkpoints.finish()
        # The results JSON in the source dataset's ids and frame, for pycocotools or a paper's tooling.
        export = None
        if cfg.eval.export_predictions:
            export = evaluator.write_results(checkpoints.directory / "predictions.json")
        if cfg.tracking.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_dir = Path(tmp)
                thresholds = cfg.eval.score_threshold, cfg.eval.mask_threshold
                save_overlays(self.overlays.samples, tmp_dir / "overlays", *thresholds)
                tracker.log_artifact(tmp_dir / "overlays", "overlays")
                tracker.log_artifact(save_curves(self.state.history, tmp_dir / "curves.png"))
                if export is not None:
                    tracker.log_artifact(export)
                    tracker.log_artifact(scored_ids_file(export))  # the imgIds to rescore it with
                if cfg.tracking.log_model and checkpoints.best.is_file():
                    tracker.log_artifact(checkpoints.best, "checkpoints")
        log.info(
            "MLflow run %s; run directory %s%s",
            tracker.run_id or "(tracking=none)",
            checkpoints.directory.absolute(),
            "" if export is None else f"; predictions {export.absolute()}",
        )
        return final


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one trial. Returns the final metrics; raises TrialStopped on prune or divergence."""
    plan = preflight(cfg)
    # A trial launched as several processes (torchrun, a multi-task SLURM job) is one DDP trial; else a no-op.
    with distributed.process_group(plan.device, cfg.trainer.get("ddp_timeout_s", DDP_TIMEOUT_S)) as world:
        trial = Trial(cfg, _for_rank(plan, world))
        # peer_failures innermost: the run records a failed rank's error, not this rank's symptom of it.
        with trial.tracker.recording(), trial.checkpoints, trial.accounting(), distributed.peer_failures():
            trial.begin()
            for epoch in trial.epochs():
                trial.run_epoch(epoch)
            final = trial.finish()
    final["run_id"] = trial.tracker.run_id  # type: ignore[assignment]
    return final


def _for_rank(plan: Plan, world: distributed.World) -> Plan:
    """A DDP trial's process: the GPU of its local rank; only rank 0 reports to Optuna (and ends a dead
    attempt's run). Every rank resumes from the same checkpoint."""
    device = distributed.trial_device(plan.device, world)
    if world.main:
        return replace(plan, device=device)
    return replace(plan, device=device, reporter=None, previous=None)


def subset_note(scored: int, total: int, limit_val_batches: int | None) -> str:
    """What the epoch line adds when AP covers only part of the val split ("" when it covers all of it)."""
    if scored >= total:
        return ""
    return f"; AP over {scored} of {total} val images (trainer.limit_val_batches={limit_val_batches})"


def model_cfg_without_pretrain(model_cfg: dict) -> dict:
    return {k: v for k, v in model_cfg.items() if k != "pretrain"}


def print_report(metrics: dict[str, float]) -> None:
    """The report's numbers for this trial, on stdout."""
    rows = [
        ("AP bbox", "val/ap_bbox"),
        ("AP segm", "val/ap_segm"),
        ("global IoU", "val/iou_global"),
        ("mean per-image IoU", "val/iou_image_mean"),
        ("matched-instance IoU", "val/iou_instance_mean"),
        ("loss in the last epoch", "final/loss_last_epoch"),
        ("loss_classifier in the last epoch", "final/loss_classifier_last_epoch"),
    ]
    for label, key in rows:
        print(f"{label:>34}: {metrics[key]:.4f}")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    """`masksweep-train`: Hydra's command line (`trial_main`), after a syntax check of the YAML files it may
    read, as Hydra would print a YAML error as the parser's traceback (HYDRA_FULL_ERROR=1 still shows it)."""
    from masksweep.configs import check_yaml_syntax

    if not _full_error():
        try:
            check_yaml_syntax(sys.argv[1:])
        except MasksweepError as exc:
            print(f"masksweep-train: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    trial_main()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def trial_main(cfg: DictConfig) -> float | None:
    """Run one trial; return the optimized metric to the sweeper."""
    try:
        with signals_raise():  # SIGTERM, like Ctrl-C, ends the MLflow run KILLED rather than RUNNING
            metrics = train(cfg)
    except KeyboardInterrupt as exc:
        if cfg.optuna.trial_number is not None:
            raise  # the Optuna sweeper records the trial FAIL, to be retried
        name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
        print(
            f"masksweep-train: stopped by {name}; its MLflow run, if started, is KILLED, and resume= "
            "continues from its last finished epoch",
            file=sys.stderr,
        )
        if _full_error():
            raise
        raise SystemExit(exc.exit_status if isinstance(exc, Interrupted) else 130) from None
    except MasksweepError as exc:
        if cfg.optuna.trial_number is not None:
            raise  # the Optuna sweeper turns it into PRUNED (stopped) or FAIL
        print(f"masksweep-train: {exc}", file=sys.stderr)
        if _in_multirun() and isinstance(exc, TrialStopped):
            return None  # recorded as KILLED in MLflow; a grid sweep goes on
        # One line, no traceback (HYDRA_FULL_ERROR=1 shows it), and a non-zero exit status.
        if _full_error():
            raise
        raise SystemExit(1) from None
    if os.environ.get("RANK", "0") == "0":  # a DDP trial reports once, on rank 0 (torchrun, submitit: RANK)
        print_report(metrics)
    return metrics[cfg.optimized_metric]


def _full_error() -> bool:
    import os

    return os.environ.get("HYDRA_FULL_ERROR") == "1"
