"""Config checks that run before any data is read or model built; each failure is one ConfigError line."""

from __future__ import annotations

from omegaconf import DictConfig

from masksweep.errors import ConfigError
from masksweep.metrics import METRIC_KEYS
from masksweep.progress import DEFAULT_EVERY_S

OPTIMIZERS = {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"}
SCHEDULERS = {"torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.CosineAnnealingLR"}
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
AMP_MODES = ("auto", "off", "fp16", "bf16")
DIVERGENCE_ACTIONS = ("prune", "fail")
EVAL_BACKENDS = ("faster_coco_eval", "pycocotools")
METRICS = tuple(f"val/{key}" for key in METRIC_KEYS)


def _number(cfg: DictConfig, key: str) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number")
    return float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(key: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value; the message names key, value and what is allowed."""
    lr = _number(cfg, "lr")
    _check_range("lr", lr, lr > 0, "a float > 0")
    weight_decay = _number(cfg, "weight_decay")
    _check_range("weight_decay", weight_decay, weight_decay >= 0, "a float >= 0")
    epochs = cfg.epochs
    _check_range(
        "epochs",
        epochs,
        isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
        "an integer >= 1",
    )

    optimizer = cfg.optimizer.get("_target_")
    if optimizer not in OPTIMIZERS:
        raise ConfigError("optimizer", optimizer, "sgd, adam, adamw (torch.optim.SGD, Adam, AdamW)")
    if cfg.momentum is not None:
        momentum = _number(cfg, "momentum")
        _check_range("momentum", momentum, 0 <= momentum < 1, "null or a float in [0, 1)")
    elif "momentum" in cfg.optimizer:
        raise ConfigError("momentum", None, f"a float in [0, 1) for {optimizer} (null only for Adam/AdamW)")

    lr_scheduler = cfg.scheduler.get("lr_scheduler")
    if lr_scheduler is not None and lr_scheduler.get("_target_") not in SCHEDULERS:
        raise ConfigError("scheduler", lr_scheduler.get("_target_"), "steplr, cosine, none")
    warmup_iters = cfg.scheduler.warmup.iters
    _check_range(
        "scheduler.warmup.iters",
        warmup_iters,
        isinstance(warmup_iters, int) and warmup_iters >= 0,
        "an integer >= 0",
    )

    from masksweep.model import ARCHS  # torchvision's detection modules: imported only when checking

    if cfg.model.arch not in ARCHS:
        raise ConfigError("model.arch", cfg.model.arch, ", ".join(ARCHS))
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise ConfigError("device", cfg.device, ", ".join(DEVICES))
    if cfg.trainer.amp not in AMP_MODES:
        raise ConfigError("trainer.amp", cfg.trainer.amp, ", ".join(AMP_MODES))
    batch_size = cfg.trainer.batch_size
    _check_range(
        "trainer.batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an integer >= 1"
    )
    # .get: a run logged before these keys existed replays (`masksweep reproduce`) with their defaults.
    every_s = cfg.trainer.get("progress_every_s", DEFAULT_EVERY_S)
    _check_range(
        "trainer.progress_every_s", every_s, _is_number(every_s) and every_s > 0, "a number of seconds > 0"
    )
    every_n = cfg.trainer.get("progress_every_n_steps")
    _check_range(
        "trainer.progress_every_n_steps",
        every_n,
        every_n is None or (isinstance(every_n, int) and not isinstance(every_n, bool) and every_n >= 1),
        "null or an integer >= 1",
    )
    max_loss = cfg.divergence.max_loss
    _check_range(
        "divergence.max_loss",
        max_loss,
        max_loss is None or (_is_number(max_loss) and max_loss > 0),
        "null (off) or a number > 0",
    )
    factor = cfg.divergence.factor
    _check_range("divergence.factor", factor, _is_number(factor) and factor > 1, "a number > 1")
    if cfg.divergence.action not in DIVERGENCE_ACTIONS:
        raise ConfigError("divergence.action", cfg.divergence.action, ", ".join(DIVERGENCE_ACTIONS))
    if cfg.eval.backend not in EVAL_BACKENDS:
        raise ConfigError("eval.backend", cfg.eval.backend, ", ".join(EVAL_BACKENDS))
    if cfg.optimized_metric not in METRICS:
        raise ConfigError("optimized_metric", cfg.optimized_metric, ", ".join(METRICS))
    # .get: a user's own data config may leave it out (masksweep.data's default applies).
    max_bad = cfg.data.get("max_bad_images", 0)
    _check_range(
        "data.max_bad_images",
        max_bad,
        isinstance(max_bad, int) and not isinstance(max_bad, bool) and max_bad >= 0,
        "an integer >= 0 (train images that may fail to decode before the run stops)",
    )
