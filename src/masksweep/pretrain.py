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
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf
from torch import nn

from masksweep import cache, engine
from masksweep.data import build_datasets, collate
from masksweep.data.synthetic import GENERATOR_VERSION
from masksweep.divergence import DivergenceDetector

log = logging.getLogger(__name__)

# Bump when the recipe below changes, so weights made by older code are not reused.
RECIPE_VERSION = 3  # 2: the slim mask head gained BatchNorm; 3: AdamW, cosine decay, bf16 where native

# Measured on the 2-core reference CPU: the tiny preset's 750 steps of 4 images at 128 px took 10 min 22 s
# (bf16, every core). Pretraining time scales with the pixels it processes; the estimate says so.
REFERENCE_SECONDS_PER_MEGAPIXEL = 622 / (750 * 4 * 128 * 128 / 1e6)


def cache_path(model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any]) -> Path:
    """The cache file for this model and recipe: a hash of every value that shapes the weights (the model's
    architecture, heads and min_size/max_size; the recipe; the code and torch versions), not of the
    dataset the trials use, so any `data=` reuses it."""
    recipe = {k: v for k, v in pretrain.items() if k not in ("enabled", "cache_dir")}
    key = json.dumps(
        [RECIPE_VERSION, GENERATOR_VERSION, torch.__version__, dict(model_kwargs), recipe], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return _cache_root(pretrain) / f"{model_kwargs['arch']}-{digest}.pt"


def _cache_root(pretrain: Mapping[str, Any]) -> Path:
    """model.pretrain.cache_dir, or (null) the user's cache: every working directory shares one pretraining"""
    return cache.resolve(pretrain.get("cache_dir"), "pretrained")


def ensure_pretrained(
    model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any], build: Callable[[], nn.Module]
) -> Path:
    """The cached pretrained weights for the model `build` makes (`model_kwargs` key the cache); trains them
    first if missing. `build` returns that model with random weights: the caller composes the model, so
    this module does not depend on masksweep.model."""
    path = cache_path(model_kwargs, pretrain)
    if path.is_file():
        log.info("Starting from the pretrained weights cached at %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel sweep workers wait for one pretraining instead of each running their own.
    with open(path.with_suffix(".lock"), "w") as lock:
        if not _try_lock(lock):
            log.info("Waiting for another process to finish pretraining into %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            _announce(model_kwargs, pretrain, path)
            # fork_rng: the trial that happens to pretrain must go on with the random stream it would have
            # had with the cache already there (RPN and RoI sampling draw from the global generator).
            with _all_cores(), torch.random.fork_rng():
                state = _pretrain(build, pretrain)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a kill mid-write never leaves a truncated cache entry
            log.info("Pretrained weights cached at %s", path)
    return path


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def estimate_minutes(pretrain: Mapping[str, Any]) -> float:
    """Pretraining time on the 2-core reference CPU, scaled by the pixels it trains on."""
    megapixels = int(pretrain["steps"]) * int(pretrain["batch_size"]) * int(pretrain["image_size"]) ** 2 / 1e6
    return megapixels * REFERENCE_SECONDS_PER_MEGAPIXEL / 60


def _minutes(minutes: float) -> str:
    return f"~{minutes:.0f} min" if minutes >= 1 else "under a minute"


def _announce(model_kwargs: Mapping[str, Any], pretrain: Mapping[str, Any], path: Path) -> None:
    """Why this expensive step runs, for how long, how to skip it and what reuses it (issue 15 item 6)."""
    log.info(
        "Pretraining %s once: model.weights is null and model.pretrain.enabled is true, so trials start "
        "from weights trained for %d steps on a separate synthetic dataset (seed %s, %d px), as the report "
        "fine-tuned pretrained weights. Estimated %s on a 2-core CPU (less with more cores or a GPU); "
        "progress is logged every ~30 s. Turn it off with model.pretrain.enabled=false (random weights) or "
        "pass model.weights=PATH. Cached at %s, keyed by the model (arch, heads, min_size=%s, max_size=%s) "
        "and the model.pretrain recipe, not by the data config: later runs with any data= reuse it.",
        model_kwargs["arch"],
        int(pretrain["steps"]),
        pretrain["seed"],
        int(pretrain["image_size"]),
        _minutes(estimate_minutes(pretrain)),
        path,
        model_kwargs.get("min_size"),
        model_kwargs.get("max_size"),
    )


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


def _pretrain(build: Callable[[], nn.Module], pretrain: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    steps = int(pretrain["steps"])
    torch.manual_seed(int(pretrain["seed"]))
    data_cfg = OmegaConf.create(
        {
            "_target_": "masksweep.data.synthetic.synthetic",
            "name": "synthetic",
            "image_size": pretrain["image_size"],
            "hflip": 0.5,
            "keep_empty": False,
            "verify": False,
            "cache_images": True,
            "num_train": pretrain["num_images"],
            "num_val": 1,
            "seed": pretrain["seed"],
            "cache_dir": str(_cache_root(pretrain) / "data"),
        }
    )
    train_set = build_datasets(data_cfg).train
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=int(pretrain["batch_size"]),
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(int(pretrain["seed"])),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build().to(device)
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
    start = time.monotonic()
    while step < steps:
        epoch += 1
        options = engine.StepOptions(
            grad_clip_norm=10.0, amp_dtype=amp_dtype, limit_batches=steps - step, progress=True
        )
        means, step = engine.train_one_epoch(
            model, optimizer, loader, device, epoch, step, detector, options, warmup=schedule
        )
        left = _minutes((time.monotonic() - start) / step * (steps - step) / 60)
        log.info("pretraining step %d/%d  loss %.4f  %s left", step, steps, means["loss"], left)
    return {k: v.cpu() for k, v in model.state_dict().items()}
