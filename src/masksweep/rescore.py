"""`masksweep evaluate`: re-score a trained model on any dataset config or on its own test split, and record
the numbers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from masksweep.checkpoint import BEST, LAST
from masksweep.errors import ConfigError

if TYPE_CHECKING:
    from masksweep.inference import TrainedModel

# Where a run's own test-split metrics are logged: test/ap_segm, ... beside val/ap_segm.
TEST_PREFIX = "test"


def checkpoint_of(run_id: str | None, checkpoint: Path | None, tracking_uri: str | None) -> Path:
    """--checkpoint as given, or the best (else last) checkpoint a logged run recorded."""
    if checkpoint is not None:
        return checkpoint
    from omegaconf import OmegaConf

    from masksweep.tracking import CLI_OPTION, checkpoint_dir_of_run

    cfg = OmegaConf.create({"tracking": {"uri": tracking_uri}})
    directory = checkpoint_dir_of_run(cfg, str(run_id), name=f"--run {run_id!r}", option=CLI_OPTION)
    for name in (BEST, LAST):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(
        "--run", run_id, f"a run whose checkpoint directory {directory} still holds {BEST} or {LAST}"
    )


def data_config(overrides: Sequence[str], trained_config: dict[str, Any]) -> tuple[DictConfig, bool]:
    """(data config, whether it is the run's own): the one the model was trained with (kept in its
    checkpoint) when no override names the data, else the `data` group composed with the overrides."""
    from omegaconf import OmegaConf

    from masksweep.configs import compose_train

    if not any(o.lstrip("+~").startswith("data") for o in overrides):
        return OmegaConf.create(trained_config["data"]), True
    return compose_train(overrides).data, False


def score_split(
    trained: TrainedModel, data_cfg: DictConfig, split: str, device: torch.device
) -> dict[str, float]:
    """The metrics of the model on one split of `data_cfg`, with the evaluation settings it was trained
    with, against the split's own ground truth at original resolution."""
    from masksweep import engine
    from masksweep.data import build_split, collate, ground_truth
    from masksweep.metrics import COCOEvaluator

    dataset = build_split(data_cfg, split)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=trained.config["trainer"]["batch_size"], collate_fn=collate
    )
    settings = trained.config["eval"]
    evaluator = COCOEvaluator(
        settings["backend"], settings["score_threshold"], settings["mask_threshold"], ground_truth(dataset)
    )
    return engine.evaluate(trained.model, loader, device, evaluator)


def rescore(
    checkpoint: Path, overrides: Sequence[str], device: torch.device, split: str = "val"
) -> tuple[str, dict[str, float]]:
    """(metric prefix, metrics) of the checkpoint's model on `split` (val or test) of the data config.

    The prefix is `test` for the run's own test split (the names `evaluate_run_on_test` logs) and
    `eval/<dataset>` (val) or `eval/<dataset>/test` for another data config."""
    from masksweep.inference import load_trained

    trained = load_trained(checkpoint, device)
    data_cfg, own = data_config(overrides, trained.config)
    metrics = score_split(trained, data_cfg, split, device)
    if own and split == "test":
        return TEST_PREFIX, metrics
    return f"eval/{data_cfg.name}" + ("/test" if split == "test" else ""), metrics


def evaluate_run_on_test(
    run_id: str, tracking_uri: str | None = None, device: torch.device | None = None
) -> dict[str, float]:
    """Score a finished run once on the test split of its own data config, and log `test/<metric>` to it.

    For the end of a study (the best trial) and `masksweep evaluate --split test`: the run's best
    checkpoint (else its last) is scored; nothing here reads or reports to Optuna. Returns the metrics
    under their logged names (`test/ap_segm`, ...). ConfigError when the run's data config has no test split
    (`data.test` null) or its checkpoints are gone.
    """
    from masksweep.inference import load_trained
    from masksweep.tracking import open_client, resolve_run_id

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    client, _ = open_client(tracking_uri, create=False)
    full_id = resolve_run_id(client, run_id)
    trained = load_trained(checkpoint_of(full_id, None, tracking_uri), device)
    data_cfg, _ = data_config((), trained.config)
    metrics = score_split(trained, data_cfg, "test", device)
    record(client, full_id, False, "", TEST_PREFIX, metrics, Path())
    return {f"{TEST_PREFIX}/{k}": v for k, v in metrics.items()}


def record(
    client,
    run_id: str | None,
    new_run: bool,
    experiment: str,
    prefix: str,
    metrics: dict[str, float],
    checkpoint: Path,
) -> str | None:
    """Log as <prefix>/<metric> to the source run, or to a new run with --new-run."""
    from mlflow.entities import Metric

    from masksweep.tracking import experiment_id

    if new_run:
        exp_id = experiment_id(client, experiment, None)
        tags = {"masksweep.evaluated_checkpoint": str(checkpoint)}
        if run_id:
            tags["masksweep.evaluated_from"] = run_id
        name = "evaluate-" + prefix.removeprefix("eval/").replace("/", "-")
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    if run_id is None:
        return None
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}/{k}", v, now, 0) for k, v in metrics.items()])
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id
