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
import math
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Bump when the recipe below changes, so weights made by older code are not reused.
RECIPE_VERSION = 3  # 2: the slim mask head gained BatchNorm; 3: AdamW, cosine decay, bf16 where native


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
            # fork_rng: the trial that happens to pretrain must go on with the random stream it would have
            # had with the cache already there (RPN and RoI sampling draw from the global generator).
            with _all_cores(), torch.random.fork_rng():
                state = _pretrain(model_kwargs, pretrain)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a kill mid-write never leaves a truncated cache entry
    return path


@contextmanager
def _all_cores() -> Iterator[None]:
    """Use every core this process may run on while pretraining, then go back. Workers of a parallel sweep
    are started with one thread each (OMP_NUM_THREADS=1) and wait on the lock meanwhile, so the one that
    pretrains would otherwise leave the other cores idle."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    # AdamW: from scratch it reached 2x the AP segm of SGD (lr 0.01, momentum 0.9) after 240 steps here.
    optimizer = torch.optim.AdamW(params, lr=float(pretrain["lr"]), weight_decay=1e-4)
    warmup_iters = int(pretrain["warmup_iters"])

    def lr_factor(iteration: int) -> float:  # linear warm-up, then a cosine decay to zero at the last step
        if iteration < warmup_iters:
            return 0.001 + 0.999 * iteration / warmup_iters
        return 0.5 * (1 + math.cos(math.pi * (iteration - warmup_iters) / max(1, steps - warmup_iters)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    schedule.total_iters = steps  # the engine steps its per-iteration `warmup` scheduler this many times
    detector = DivergenceDetector(warmup_steps=steps)  # only non-finite or huge losses stop pretraining
    amp_dtype = engine.resolve_amp("auto", device)
    amp_dtype = amp_dtype if amp_dtype == torch.bfloat16 else None  # fp16 would need a GradScaler
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        options = engine.StepOptions(
            grad_clip_norm=10.0, amp_dtype=amp_dtype, limit_batches=steps - step, progress=sys.stderr.isatty()
        )
        means, step = engine.train_one_epoch(
            model, optimizer, loader, device, epoch, step, detector, options, warmup=schedule
        )
        log.info("pretraining step %d/%d  loss %.4f", step, steps, means["loss"])
    return {k: v.cpu() for k, v in model.state_dict().items()}
