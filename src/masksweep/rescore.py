"""`masksweep evaluate`: re-score a trained model on any dataset config, and record the numbers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from masksweep.checkpoint import BEST, LAST
from masksweep.errors import ConfigError


def checkpoint_of(run_id: str | None, checkpoint: Path | None, tracking_uri: str | None) -> Path:
    """--checkpoint as given, or the best (else last) checkpoint a logged run recorded."""
    if checkpoint is not None:
        return checkpoint
    from omegaconf import OmegaConf

    from masksweep.tracking import checkpoint_dir_of_run

    directory = checkpoint_dir_of_run(OmegaConf.create({"tracking": {"uri": tracking_uri}}), str(run_id))
    for name in (BEST, LAST):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(
        "--run", run_id, f"a run whose checkpoint directory {directory} still holds {BEST} or {LAST}"
    )


def data_config(overrides: Sequence[str], image_size: int) -> DictConfig:
    """The `data` group composed with the user's overrides, at the resolution the model was trained at."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from masksweep.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    data = cfg.data
    with open_dict(data):
        data.image_size = image_size
    return data


def rescore(checkpoint: Path, overrides: Sequence[str], device: torch.device) -> tuple[str, dict[str, float]]:
    """(dataset name, metrics) of the checkpoint's model on the val split of the composed data config,
    scored with the evaluation settings the model was trained with."""
    from masksweep import engine
    from masksweep.data import build_datasets, collate
    from masksweep.inference import load_trained
    from masksweep.metrics import COCOEvaluator

    trained = load_trained(checkpoint, device)
    data_cfg = data_config(overrides, trained.image_size)
    _, val_set = build_datasets(data_cfg)
    loader = torch.utils.data.DataLoader(
        val_set, batch_size=trained.config["trainer"]["batch_size"], collate_fn=collate
    )
    settings = trained.config["eval"]
    evaluator = COCOEvaluator(settings["backend"], settings["score_threshold"], settings["mask_threshold"])
    metrics = engine.evaluate(trained.model, loader, device, evaluator)
    return str(data_cfg.name), metrics


def record(
    client,
    run_id: str | None,
    new_run: bool,
    experiment: str,
    dataset: str,
    metrics: dict[str, float],
    checkpoint: Path,
) -> str | None:
    """Log as eval/<dataset>/<metric> to the source run, or to a new run with --new-run."""
    from mlflow.entities import Metric

    from masksweep.tracking import experiment_id

    if new_run:
        exp_id = experiment_id(client, experiment, None)
        tags = {"masksweep.evaluated_checkpoint": str(checkpoint)}
        if run_id:
            tags["masksweep.evaluated_from"] = run_id
        run_id = client.create_run(exp_id, run_name=f"evaluate-{dataset}", tags=tags).info.run_id
    if run_id is None:
        return None
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{dataset}/{k}", v, now, 0) for k, v in metrics.items()])
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id
