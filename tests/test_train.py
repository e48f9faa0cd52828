"""End-to-end trials of the tiny preset: finite losses, determinism, pretraining cache, clean CLI errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from masksweep.cache import cache_dir
from masksweep.errors import DataError, TrialDiverged
from masksweep.pretrain import cache_path
from masksweep.train import train

REPORT_KEYS = (
    "val/ap_bbox",
    "val/ap_segm",
    "val/iou_global",
    "final/loss_last_epoch",
    "final/loss_classifier_last_epoch",
)


def test_smoke_trial_ends_with_finite_losses(make_cfg) -> None:
    metrics = train(make_cfg("tracking=none"))
    for key in REPORT_KEYS:
        assert math.isfinite(metrics[key]), key
    assert metrics["final/loss_last_epoch"] > metrics["final/loss_classifier_last_epoch"] > 0
    assert 0.0 <= metrics["val/ap_segm"] <= 1.0


@pytest.mark.slow
def test_same_config_gives_identical_losses_and_ap(make_cfg) -> None:
    cfg = make_cfg("tracking=none", "epochs=2", "data.hflip=0.5", "scheduler.warmup.iters=2")
    first, second = train(cfg), train(cfg)
    assert {k: v for k, v in first.items() if k != "run_id"} == {
        k: v for k, v in second.items() if k != "run_id"
    }


@pytest.mark.slow
def test_other_seed_gives_other_losses(make_cfg) -> None:
    first = train(make_cfg("tracking=none", "seed=1"))
    second = train(make_cfg("tracking=none", "seed=2"))
    assert first["final/loss_last_epoch"] != second["final/loss_last_epoch"]


def test_exploding_lr_diverges_within_a_few_steps(make_cfg) -> None:
    cfg = make_cfg(
        "tracking=none",
        "lr=50",
        "trainer.limit_train_batches=12",
        "divergence.sync_every=4",
        "trainer.grad_clip_norm=null",
    )
    with pytest.raises(TrialDiverged) as info:
        train(cfg)
    assert info.value.step <= 12 and info.value.reason


@pytest.mark.slow
def test_pretraining_is_cached_and_keyed_by_its_params(make_cfg, workdir: Path) -> None:
    overrides = (
        "tracking=none",
        "++model.pretrain.enabled=true",
        "model.pretrain.steps=2",
        "model.pretrain.num_images=4",
        "model.pretrain.batch_size=2",
        "model.pretrain.warmup_iters=1",
    )
    cfg = make_cfg(*overrides)
    first = train(cfg)
    cached = sorted((cache_dir() / "pretrained").glob("*.pt"))  # the user's cache (a test's own, conftest)
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = train(cfg)  # reuses the cache
    assert cached[0].stat().st_mtime_ns == mtime
    # The trial that pretrained went on with the random stream of one that found the cache.
    assert {k: v for k, v in first.items() if k != "run_id"} == {
        k: v for k, v in second.items() if k != "run_id"
    }
    state = torch.load(cached[0], weights_only=True)
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    other = make_cfg(*overrides, "model.pretrain.steps=3")
    assert cache_path({"arch": "a"}, other.model.pretrain) != cache_path({"arch": "a"}, cfg.model.pretrain)


@pytest.mark.slow
def test_corrupt_image_is_named_when_first_read(make_cfg, synthetic_cache: Path, workdir: Path) -> None:
    cfg = make_cfg("tracking=none", f"data.cache_dir={workdir / 'own-cache'}", "data.cache_images=false")
    train(cfg)  # generates the dataset
    victim = sorted((workdir / "own-cache").rglob("*.png"))[0]
    victim.write_bytes(b"not a png")
    with pytest.raises(DataError, match=victim.name):
        train(make_cfg("tracking=none", f"data.cache_dir={workdir / 'own-cache'}", "data.verify=true"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    exe = Path(sys.executable).with_name("masksweep-train")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "args,needle",
    [
        (("lr=-1",), "lr=-1"),
        (("momentum=1.5",), "momentum=1.5"),
        (("epochs=0",), "epochs=0"),
        (("model.arch=resnet9",), "model.arch='resnet9'"),
        (("data=coco", "data.train.ann_file=/nonexistent/coco/train.json"), "/nonexistent/coco/train.json"),
    ],
)
def test_cli_bad_input_is_one_line_and_non_zero(workdir: Path, args: tuple[str, ...], needle: str) -> None:
    result = run_cli(*args, "tracking=none", cwd=workdir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("masksweep-train:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr
    assert not (workdir / "mlruns").exists()  # nothing recorded for a trial that never started


def test_cli_unknown_optimizer_names_the_options(workdir: Path) -> None:
    result = run_cli("optimizer=rmsprop", cwd=workdir)
    assert result.returncode != 0
    assert "optimizer/rmsprop" in result.stderr and "sgd" in result.stderr


def test_amp_modes_resolve_to_autocast_dtypes() -> None:
    from masksweep.engine import _cpu_computes_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    # auto takes bf16 on a CPU only where it is computed natively, where it is faster than fp32
    assert resolve_amp("auto", cpu) is (torch.bfloat16 if _cpu_computes_bf16() else None)


def test_a_bf16_trial_ends_with_finite_losses(make_cfg) -> None:
    metrics = train(make_cfg("tracking=none", "trainer.amp=bf16"))
    assert math.isfinite(metrics["final/loss_last_epoch"]) and metrics["final/loss_last_epoch"] > 0
