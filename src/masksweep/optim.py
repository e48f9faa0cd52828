"""Optimizer, per-epoch lr scheduler and per-iteration linear warm-up, from their config groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_optimizer(optimizer_cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return instantiate(optimizer_cfg)(params)


def build_scheduler(
    scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The epoch-level scheduler (stepped after each epoch), or None for a constant lr."""
    if scheduler_cfg.lr_scheduler is None:
        return None
    return instantiate(scheduler_cfg.lr_scheduler)(optimizer)


def build_warmup(
    scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LinearLR | None:
    """A linear warm-up stepped every iteration, as in torchvision's detection references.

    LinearLR is chainable, so it composes with the epoch scheduler on the same optimizer.
    """
    iters = scheduler_cfg.warmup.iters
    if iters <= 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=scheduler_cfg.warmup.start_factor, total_iters=iters
    )
