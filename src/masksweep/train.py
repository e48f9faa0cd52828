"""`masksweep-train`: one Mask R-CNN trial, composed by Hydra. `train(cfg)` is the testable core."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from masksweep import engine
from masksweep.errors import ConfigError, MasksweepError, TrialStopped
from masksweep.validation import validate

log = logging.getLogger(__name__)

# The Optuna user attr where a sweep trial records its checkpoint directory, for a retry to resume from.
CHECKPOINT_DIR_ATTR = "checkpoint_dir"
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loader(
    dataset, cfg: DictConfig, train: bool, generator: torch.Generator
) -> torch.utils.data.DataLoader:
    from masksweep.data import collate

    workers = cfg.trainer.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.trainer.batch_size,
        shuffle=train,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=workers > 0,  # re-forking workers every epoch costs seconds per epoch
        pin_memory=torch.cuda.is_available(),
    )


@dataclass
class Progress:
    """What a checkpoint restores besides the modules: where the trial is and what it has seen."""

    epoch: int = 0
    global_step: int = 0
    best: float = -math.inf
    history: list[dict[str, float]] = field(default_factory=list)


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


def attempt_checkpoint(previous: tuple[int, dict] | None) -> Path | None:
    """For a sweep trial retried after its worker died: the last checkpoint of the attempt that died, so a
    kill costs at most one epoch."""
    from masksweep.checkpoint import LAST

    directory = previous[1].get(CHECKPOINT_DIR_ATTR) if previous else None
    if directory is None or not (Path(directory) / LAST).is_file():
        return None
    log.info("Retrying trial %d: resuming from its last checkpoint in %s", previous[0], directory)
    return Path(directory) / LAST


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one trial. Returns the final metrics; raises TrialStopped on prune or divergence."""
    validate(cfg)
    # Heavy or optional modules load here, so `masksweep-train --help` stays fast.
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from masksweep import checkpoint
    from masksweep.artifacts import OverlaySamples, save_curves, save_overlays
    from masksweep.data import build_datasets, dataset_fingerprint
    from masksweep.divergence import DivergenceDetector
    from masksweep.metrics import COCOEvaluator
    from masksweep.optim import build_optimizer, build_scheduler, build_warmup
    from masksweep.tracking import log_run_inputs, redacted_config, start_tracker

    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, val_set = build_datasets(cfg.data)
    train_loader = make_loader(train_set, cfg, train=True, generator=generator)
    val_loader = make_loader(val_set, cfg, train=False, generator=generator)

    reporter = None
    if cfg.optuna.trial_number is not None:
        from masksweep.pruning import TrialReporter

        reporter = TrialReporter.from_config(cfg.optuna)
    checkpoints = checkpoint.CheckpointManager(checkpoint_dir(cfg), cfg.checkpoint.keep)
    previous = reporter.previous_attempt() if reporter is not None else None
    resume_from = (
        resume_path(str(cfg.resume), cfg) if cfg.resume is not None else attempt_checkpoint(previous)
    )

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    saved = checkpoint.load(resume_from) if resume_from is not None else None
    if saved is not None:
        checkpoint.check_compatible(saved, model_cfg, resume_from)
        # A finished trial keeps weights only; that is enough to redo its end (a kill after the last epoch)
        # but not to train on.
        if "optimizer" not in saved and saved["progress"]["epoch"] < cfg.epochs:
            raise ConfigError("resume", str(resume_from),
                              "the last.pt of an unfinished trial (a finished trial keeps its weights only)")
        model_cfg["pretrain"] = None  # the checkpoint holds the weights; no need to pretrain or load again
    model = instantiate(model_cfg).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(cfg.scheduler, optimizer)
    warmup = build_warmup(cfg.scheduler, optimizer)
    amp_dtype = engine.resolve_amp(cfg.trainer.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    detector = DivergenceDetector(**cfg.divergence)
    stateful = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "warmup": warmup,
        "scaler": scaler,
        "divergence": detector,
    }
    progress = Progress()
    if saved is not None:
        for key, module in stateful.items():
            if module is not None and key in saved:
                module.load_state_dict(saved[key])
        if "rng" in saved:
            checkpoint.restore_rng(saved["rng"], generator)
        progress = Progress(**saved["progress"])
        log.info("Resuming from %s after epoch %d", resume_from, progress.epoch)

    evaluator = COCOEvaluator(cfg.eval.backend, cfg.eval.score_threshold, cfg.eval.mask_threshold)
    options = engine.StepOptions(
        grad_clip_norm=cfg.trainer.grad_clip_norm,
        amp_dtype=amp_dtype,
        log_every=cfg.trainer.log_every_n_steps,
        limit_batches=cfg.trainer.limit_train_batches,
        progress=cfg.trainer.progress and sys.stderr.isatty(),
    )
    tracker = start_tracker(cfg)
    # The val overlays are drawn from the last epoch's evaluation, not from a second pass of the model.
    overlays = OverlaySamples(cfg.tracking.num_overlays if cfg.tracking.enabled else 0)
    with tracker.recording(), checkpoints:
        log_run_inputs(tracker, cfg, {"data.fingerprint": dataset_fingerprint(train_set)})
        if reporter is not None:
            reporter.set_user_attr(CHECKPOINT_DIR_ATTR, str(checkpoints.directory.absolute()))
        if previous is not None:  # the dead attempt could not end its own run
            tracker.fail_abandoned(cfg.optuna.study_name, previous[0], reporter.number)
        tracker.set_tags(
            {
                "masksweep.checkpoint_dir": str(checkpoints.directory.absolute()),
                **({"masksweep.resumed_from": str(resume_from)} if resume_from else {}),
            }
        )
        for row in progress.history:  # a resumed run carries the whole curve
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        resumed_after_the_last_epoch = progress.epoch >= cfg.epochs
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            tic = time.perf_counter()
            try:
                means, steps_end = engine.train_one_epoch(
                    model,
                    optimizer,
                    train_loader,
                    device,
                    epoch,
                    progress.global_step,
                    detector,
                    options,
                    warmup=warmup,
                    scaler=scaler,
                    on_log=lambda step, values: tracker.log_metrics(
                        {f"train/{k}": v for k, v in values.items()}, step
                    ),
                )
            except TrialStopped as stop:
                if cfg.divergence.action == "fail":
                    raise MasksweepError(f"trial diverged at step {stop.step}: {stop.reason}") from stop
                raise
            seconds = time.perf_counter() - tic
            images = (steps_end - progress.global_step) * cfg.trainer.batch_size
            if scheduler is not None:
                scheduler.step()
            val = engine.evaluate(
                model,
                val_loader,
                device,
                evaluator,
                cfg.trainer.limit_val_batches,
                on_batch=overlays if epoch == cfg.epochs else None,
            )
            row = {
                "epoch": epoch,
                **{f"train/epoch_{k}": v for k, v in means.items()},
                **{f"val/{k}": v for k, v in val.items()},
                "time/epoch_seconds": seconds,
                "time/images_per_second": images / seconds,
            }
            improved = row[cfg.optimized_metric] > progress.best
            progress = Progress(
                epoch, steps_end, max(progress.best, row[cfg.optimized_metric]), [*progress.history, row]
            )
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            tracker.flush()
            checkpoints.save(
                {
                    **{k: m.state_dict() for k, m in stateful.items() if m is not None},
                    "rng": checkpoint.rng_state(generator),
                    "progress": asdict(progress),
                    "model_config": model_cfg_without_pretrain(model_cfg),
                    "config": OmegaConf.to_yaml(redacted_config(cfg)),
                },
                improved,
                final=epoch == cfg.epochs,
            )
            log.info(
                "epoch %d/%d  loss %.4f  AP bbox %.3f  AP segm %.3f  IoU %.3f  (%.1fs)",
                epoch,
                cfg.epochs,
                means["loss"],
                val["ap_bbox"],
                val["ap_segm"],
                val["iou_global"],
                seconds,
            )
            if reporter is not None:
                reporter.report(row[cfg.optimized_metric], epoch)

        last = progress.history[-1]
        final = {
            "final/loss_last_epoch": last["train/epoch_loss"],
            "final/loss_classifier_last_epoch": last["train/epoch_loss_classifier"],
            f"final/best_{cfg.optimized_metric.removeprefix('val/')}": progress.best,
            **{k: v for k, v in last.items() if k.startswith("val/")},
        }
        tracker.log_metrics({k: v for k, v in final.items() if k.startswith("final/")}, step=cfg.epochs)
        if resumed_after_the_last_epoch and (cfg.tracking.enabled or cfg.eval.export_predictions):
            # No evaluation ran in this process to draw the overlays from or to export.
            limit = cfg.trainer.limit_val_batches
            engine.evaluate(model, val_loader, device, evaluator, limit, on_batch=overlays)
        checkpoints.finish()
        if cfg.tracking.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_dir = Path(tmp)
                save_overlays(
                    overlays.samples, tmp_dir / "overlays", cfg.eval.score_threshold, cfg.eval.mask_threshold
                )
                tracker.log_artifact(tmp_dir / "overlays", "overlays")
                tracker.log_artifact(save_curves(progress.history, tmp_dir / "curves.png"))
                if cfg.eval.export_predictions:
                    tracker.log_artifact(evaluator.write_results(tmp_dir / "predictions.json"))
                if cfg.tracking.log_model and checkpoints.best.is_file():
                    tracker.log_artifact(checkpoints.best, "checkpoints")
        if cfg.eval.export_predictions:
            evaluator.write_results(checkpoints.directory / "predictions.json")
    final["run_id"] = tracker.run_id  # type: ignore[assignment]
    return final


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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one trial; return the optimized metric to the sweeper."""
    try:
        metrics = train(cfg)
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
    print_report(metrics)
    return metrics[cfg.optimized_metric]


def _full_error() -> bool:
    import os

    return os.environ.get("HYDRA_FULL_ERROR") == "1"
