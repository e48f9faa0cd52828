"""One-time pretraining of a preset on a *different* synthetic dataset, cached like downloaded weights.

The report fine-tuned a COCO-pretrained Mask R-CNN with small learning rates. No pretrained ResNet-18 Mask
R-CNN can be downloaded here, so the tiny preset makes its own: trained once at a high lr on synthetic images
drawn with another seed, saved under the cache and keyed by every parameter that shapes the weights. Trials
then fine-tune from it, as in the report.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Bump when the recipe below changes, so weights made by older code are not reused.
RECIPE_VERSION = 2  # 2: the slim mask head gained BatchNorm


def cache_path(model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any]) -> Path:
    from masksweep.data.synthetic import GENERATOR_VERSION

    recipe = {k: v for k, v in pretrain.items() if k not in ("enabled", "cache_dir")}
    key = json.dumps(
        [RECIPE_VERSION, GENERATOR_VERSION, torch.__version__, dict(model_kwargs), recipe], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(pretrain["cache_dir"]) / f"{model_kwargs['arch']}-{digest}.pt"


def ensure_pretrained(model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any]) -> Path:
    """The cached pretrained weights for this model and recipe; trains them first if missing."""
    path = cache_path(model_kwargs, pretrain)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel sweep workers wait for one pretraining instead of each running their own.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            state = _pretrain(model_kwargs, pretrain)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a kill mid-write never leaves a truncated cache entry
    return path


def _pretrain(model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from masksweep import engine
    from masksweep.data import build_datasets, collate
    from masksweep.divergence import DivergenceDetector
    from masksweep.model import build_model

    steps = int(pretrain["steps"])
    log.info(
        "Pretraining %s once for %d steps on synthetic data (seed %s); cached for later runs.",
        model_kwargs["arch"],
        steps,
        pretrain["seed"],
    )
    torch.manual_seed(int(pretrain["seed"]))
    data_cfg = OmegaConf.create(
        {
            "name": "synthetic",
            "image_size": pretrain["image_size"],
            "hflip": 0.5,
            "keep_empty": False,
            "verify": False,
            "cache_images": True,
            "num_train": pretrain["num_images"],
            "num_val": 1,
            "seed": pretrain["seed"],
            "cache_dir": str(Path(pretrain["cache_dir"]) / "data"),
        }
    )
    train_set, _ = build_datasets(data_cfg)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=int(pretrain["batch_size"]),
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(int(pretrain["seed"])),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(**model_kwargs).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(pretrain["lr"]), momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=0.001, total_iters=int(pretrain["warmup_iters"])
    )
    detector = DivergenceDetector(warmup_steps=steps)  # only non-finite or huge losses stop pretraining
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        options = engine.StepOptions(grad_clip_norm=10.0, limit_batches=steps - step)
        means, step = engine.train_one_epoch(
            model, optimizer, loader, device, epoch, step, detector, options, warmup=warmup
        )
        log.info("pretraining step %d/%d  loss %.4f", step, steps, means["loss"])
    return {k: v.cpu() for k, v in model.state_dict().items()}
