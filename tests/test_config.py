"""Every config option composes, every _target_ instantiates, and bad values fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from masksweep.configs import CONFIG_DIR
from masksweep.errors import ConfigError
from masksweep.optim import build_optimizer, build_scheduler, build_warmup
from masksweep.validation import validate

GROUPS = ("model", "data", "optimizer", "scheduler", "trainer", "tracking", "divergence", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}", tiny=False)
    validate(cfg)


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_targets_instantiate(make_cfg, option: str) -> None:
    cfg = make_cfg(f"optimizer={option}", "momentum=null" if option != "sgd" else "momentum=0.9")
    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["lr"] == cfg.lr
    assert optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_targets_instantiate(make_cfg, option: str) -> None:
    cfg = make_cfg(f"scheduler={option}", "scheduler.warmup.iters=5")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    scheduler = build_scheduler(cfg.scheduler, optimizer)
    warmup = build_warmup(cfg.scheduler, optimizer)
    assert (scheduler is None) == (option == "none")
    assert warmup is not None and optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.001)


def test_steplr_and_cosine_follow_the_report(make_cfg) -> None:
    steplr = make_cfg("scheduler=steplr").scheduler.lr_scheduler
    assert (steplr.step_size, steplr.gamma) == (3, 0.1)
    assert make_cfg("scheduler=cosine", "epochs=7").scheduler.lr_scheduler.T_max == 7


@pytest.mark.parametrize("option", options("model"))
def test_model_targets_instantiate(make_cfg, option: str) -> None:
    model = instantiate(make_cfg(f"model={option}", "++model.pretrain.enabled=false", tiny=False).model)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2


REPORT_TABLE = {
    # trial: (optimizer target, scheduler target, lr, momentum, weight decay, epochs)
    "trial1": ("torch.optim.SGD", "StepLR", 0.0005, 0.9, 0.0005, 5),
    "trial2": ("torch.optim.SGD", "StepLR", 0.001, 0.9, 0.0005, 5),
    "trial3": ("torch.optim.Adam", "StepLR", 0.001, None, 0.0005, 5),
    "trial4": ("torch.optim.Adam", "CosineAnnealingLR", 0.005, None, 0.0005, 5),
    "trial5": ("torch.optim.SGD", "StepLR", 0.001, 0.9, 0.005, 5),
    "trial6": ("torch.optim.SGD", "StepLR", 0.001, 0.9, 0.0005, 10),
}


@pytest.mark.parametrize("trial", sorted(REPORT_TABLE))
def test_experiments_reproduce_the_report_table(make_cfg, trial: str) -> None:
    cfg = make_cfg(f"experiment={trial}", tiny=False)
    optimizer, scheduler, lr, momentum, weight_decay, epochs = REPORT_TABLE[trial]
    assert cfg.optimizer._target_ == optimizer
    assert cfg.scheduler.lr_scheduler._target_.endswith(scheduler)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs) == (lr, momentum, weight_decay, epochs)
    assert cfg.trial_name == trial
    built = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    if momentum is None:
        assert built["betas"] == (0.9, 0.999)  # "momentum: none" = Adam's defaults
    else:
        assert built["momentum"] == momentum


@pytest.mark.parametrize(
    "override,key",
    [
        ("lr=0", "lr"),
        ("lr=-0.1", "lr"),
        ("momentum=1.0", "momentum"),
        ("momentum=-0.5", "momentum"),
        ("momentum=null", "momentum"),  # sgd needs one
        ("weight_decay=-1e-4", "weight_decay"),
        ("epochs=0", "epochs"),
        ("epochs=2.5", "epochs"),
        ("model.arch=resnet9000", "model.arch"),
        ("optimizer._target_=torch.optim.RMSprop", "optimizer"),
        ("scheduler.lr_scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "scheduler"),
        ("device=tpu", "device"),
        ("divergence.action=ignore", "divergence.action"),
        ("optimized_metric=val/accuracy", "optimized_metric"),
    ],
)
def test_bad_values_name_key_value_and_allowed(make_cfg, override: str, key: str) -> None:
    cfg = make_cfg(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    message = str(info.value)
    assert key in message and "allowed" in message and "\n" not in message
