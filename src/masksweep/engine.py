"""One training epoch and one evaluation pass, in the shape of torchvision's detection references.

Unlike the references, a bad loss raises TrialDiverged (via the DivergenceDetector) instead of exiting,
and no step forces a host sync except the every-N-steps logging read. The steps between two reads stay on
the device, so a trial that stops (diverged, pruned, interrupted) still logs every step up to the stop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from masksweep import distributed
from masksweep.divergence import DivergenceDetector
from masksweep.metrics import COCOEvaluator
from masksweep.progress import DEFAULT_EVERY_S, ProgressLog

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
STEP_KEYS = (*LOSS_KEYS, "loss")

StepLogger = Callable[[int, dict[str, float]], None]
BatchHook = Callable[[list[torch.Tensor], list[dict], list[dict]], None]  # (images, targets, outputs)


@dataclass(frozen=True)
class StepOptions:
    grad_clip_norm: float | None = None
    amp_dtype: torch.dtype | None = None  # None = full precision
    log_every: int = 10
    limit_batches: int | None = None
    progress: bool = False  # a bar on a terminal, else a log line every progress_every_s / _n steps
    progress_every_s: float = DEFAULT_EVERY_S
    progress_every_n: int | None = None


def _cpu_computes_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX). Elsewhere bf16 is emulated
    and slower than fp32. torch exposes the check only as a private op, hence the guard."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    except RuntimeError:  # pragma: no cover - a torch build without the op
        return False


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for trainer.amp. auto: bf16 where the hardware computes it natively (a CUDA GPU
    with bf16, or a CPU with bf16 kernels: 1.4x a fp32 step of the tiny preset on an AVX512-BF16 EPYC),
    fp16 on older GPUs, else full precision."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and _cpu_computes_bf16() else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def _plain(value: object, device: torch.device) -> object:
    # tv_tensors subclasses carry metadata the detector does not need; plain tensors skip their wrapping.
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor).to(device, non_blocking=True)
    return value


def to_device(
    images: Iterable[torch.Tensor], targets: Iterable[dict], device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    return (
        [_plain(image, device) for image in images],
        [{k: _plain(v, device) for k, v in target.items()} for target in targets],
    )


def _num_batches(loader: DataLoader, limit: int | None) -> int:
    return len(loader) if limit is None else min(limit, len(loader))


def _batches(
    loader: DataLoader, limit: int | None, progress: bool, desc: str, every_n: int | None = None
) -> Iterable:
    total = _num_batches(loader, limit)
    shown = ProgressLog(total, desc, enabled=progress, every_n=every_n, unit="batch")
    return shown.wrap(itertools.islice(loader, total))


class _UnloggedSteps:
    """The per-step losses since the last logged step, kept on the device: a stopped trial flushes them, so
    its curve runs up to the step that stopped it. Rows are written by a device-side copy, the step numbers
    and learning rates are host values: recording a step costs no host sync."""

    def __init__(self, size: int, device: torch.device) -> None:
        self._values = torch.zeros((max(size, 1), len(STEP_KEYS)), device=device)
        self._steps: list[tuple[int, float]] = []

    def add(self, step: int, values: torch.Tensor, lr: float) -> None:
        if len(self._steps) == len(self._values):  # on_log never came (no logger): keep the latest
            self._steps.clear()
        self._values[len(self._steps)] = values
        self._steps.append((step, lr))

    def clear(self) -> None:
        self._steps.clear()

    def flush(self, on_log: StepLogger) -> None:
        """Log every recorded step (one host read for all of them)."""
        rows = self._values[: len(self._steps)].tolist()
        for (step, lr), row in zip(self._steps, rows, strict=True):
            on_log(step, {**dict(zip(STEP_KEYS, row, strict=True)), "lr": lr})
        self._steps.clear()


def _grad_norm(params: list[torch.nn.Parameter], max_norm: float | None, needed: bool) -> torch.Tensor | None:
    """Clip to `max_norm` and return the total gradient norm (the divergence detector checks it).

    Without clipping only the norm is computed: clip_grad_norm_(params, inf) would also multiply every
    gradient by 1.0, a second full pass over the gradients that costs as much as the norm itself (about 1% of
    a tiny-preset CPU step). Without clipping and without divergence checks nothing is computed at all.
    """
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not needed:
        return None
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is None:  # pragma: no cover - older torch
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return total_norm(grads)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    global_step: int,
    detector: DivergenceDetector,
    options: StepOptions,
    warmup: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_log: StepLogger | None = None,
) -> tuple[dict[str, float], int]:
    """Train for one epoch. Returns the mean of each loss over the epoch and the next global step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = torch.zeros(len(STEP_KEYS), device=device)
    steps = 0
    autocast = (
        torch.autocast(device.type, dtype=options.amp_dtype)
        if options.amp_dtype is not None
        else contextlib.nullcontext()
    )
    total_batches = _num_batches(loader, options.limit_batches)
    progress = ProgressLog(
        total_batches,
        f"epoch {epoch}",
        enabled=options.progress,
        every_s=options.progress_every_s,
        every_n=options.progress_every_n,
    )
    # Between two logs an epoch records at most min(log_every, its batches) steps: a log_every far beyond the
    # epoch (a benchmark that logs almost never) must not size the buffer (10**9 rows would be 24 GB).
    unlogged = _UnloggedSteps(min(options.log_every, total_batches), device)
    try:
        for images, targets in progress.wrap(itertools.islice(loader, total_batches)):
            images, targets = to_device(images, targets, device)
            with autocast:
                loss_dict = model(images, targets)
            losses = torch.stack([loss_dict[k] for k in LOSS_KEYS]).float()
            total = losses.sum()
            grad_norm = _optimize(total, params, optimizer, options.grad_clip_norm, detector.enabled, scaler)
            if warmup is not None and global_step < warmup.total_iters:
                warmup.step()

            # Averaged over the ranks of a DDP trial (the loss of the whole batch): what is logged, and what
            # the detector sees, so that every rank latches the same step and stops at the same sync.
            step_values = distributed.mean_over_ranks(torch.cat([losses.detach(), total.detach()[None]]))
            sums += step_values
            steps += 1
            global_step += 1
            lr = optimizer.param_groups[0]["lr"]
            if on_log is not None:
                unlogged.add(global_step, step_values, lr)
            # With AMP fp16 the scaler skips non-finite steps on purpose, so only the loss is checked then.
            detector.update(global_step, step_values[-1], None if scaler is not None else grad_norm)
            if on_log is not None and global_step % options.log_every == 0:
                # The one host sync of the N steps.
                values = {**dict(zip(STEP_KEYS, step_values.tolist(), strict=True)), "lr": lr}
                on_log(global_step, values)
                unlogged.clear()
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        detector.check()
    except BaseException:
        # Diverged, pruned mid-epoch, interrupted or crashed: the steps since the last log are the evidence.
        if on_log is not None:
            _flush_quietly(unlogged, on_log)
        raise
    means = (sums / max(steps, 1)).tolist()
    return dict(zip(STEP_KEYS, means, strict=True)), global_step


def _optimize(
    total: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float | None,
    norm_needed: bool,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor | None:
    """Backward, clip, optimizer step; returns the gradient norm (None when neither clipping nor the
    divergence check needs it)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    grad_norm = _grad_norm(params, grad_clip_norm, norm_needed)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def _flush_quietly(unlogged: _UnloggedSteps, on_log: StepLogger) -> None:
    try:
        unlogged.flush(on_log)
    except Exception as exc:  # the stop itself matters more than its last few points
        log.warning("could not log the last steps before the stop: %s", exc)


@torch.inference_mode()
def predict(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device) -> list[dict]:
    """Run the model in eval mode on a list of images (any sizes); outputs come back on the CPU.

    The model's transform resizes each image (aspect kept) and its postprocess maps boxes and pastes masks
    back at the image's own size, so outputs are in the input's frame."""
    model.eval()
    outputs = model([image.as_subclass(torch.Tensor).to(device) for image in images])
    return [{k: v.cpu() for k, v in output.items()} for output in outputs]


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    evaluator: COCOEvaluator,
    limit_batches: int | None = None,
    progress: bool = False,
    on_batch: BatchHook | None = None,
    progress_every_n: int | None = None,
) -> dict[str, float]:
    """COCO AP (bbox, segm) and the IoUs over the loader's split, at original resolution (against the
    evaluator's ground truth: the dataset's own when it was given one). `on_batch` sees each batch with its
    outputs, e.g. to draw overlays from these predictions instead of running the model again."""
    evaluator.reset()
    for images, targets in _batches(loader, limit_batches, progress, "eval", progress_every_n):
        outputs = predict(model, images, device)
        evaluator.process(targets, outputs)
        if on_batch is not None:
            on_batch(images, targets, outputs)
    return distributed.evaluate(evaluator)  # a DDP trial's shards, scored together on rank 0
