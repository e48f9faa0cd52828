"""Figure 6: the GPU (only with `--device cuda` on a machine that has one; never in CI).

- images/s and peak memory of `maskrcnn_resnet50_fpn` at the report's scale (800 px) through
  `engine.train_one_epoch`: fp32 vs AMP (bf16 where supported, else fp16 with a GradScaler), each with and
  without channels_last; finite losses and the loss trend (first vs last steps) for each;
- the DataLoader: time the training loop waits for its next batch, per step, for 0 / 4 / 8 workers with
  pinned memory and persistent workers.
Target: AMP >= 1.5x fp32 throughput with finite losses and the same trend.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

from bench.common import Context, Figure, Target, interleaved, log, summary

AMP_TARGET = 1.5


def not_measured(ctx: Context, why: str) -> Figure:
    fig = Figure(
        "6", "GPU", "maskrcnn_resnet50_fpn at 800 px, fp32 vs AMP, channels_last, DataLoader workers"
    )
    fig.targets.append(
        Target("AMP vs fp32 throughput", f">= {AMP_TARGET}x, finite losses, same trend", why, None)
    )
    fig.notes.append(f"Not measured: {why}. Run `python -m bench --device cuda` on a GPU machine.")
    return fig


def run(ctx: Context, force: bool = False) -> Figure:
    import torch

    if not force:
        if not ctx.device.startswith("cuda"):
            return not_measured(ctx, "no GPU lent (run with --device cuda)")
        if not torch.cuda.is_available():
            return not_measured(ctx, "--device cuda given but torch sees no CUDA device")
    return measure(ctx)


def measure(ctx: Context) -> Figure:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from masksweep import engine
    from masksweep.data import build_datasets, collate
    from masksweep.divergence import DivergenceDetector
    from masksweep.optim import build_optimizer

    s = ctx.sizes
    device = ctx.torch_device()
    cuda = device.type == "cuda"
    count = s.gpu_batch_size * (s.gpu_steps + 3)
    cfg = ctx.compose(
        # A smoke (CPU dry) run checks the harness with the tiny preset: ResNet-50 FPN in bf16 autocast with
        # channels_last on a CPU ran past 24 GiB here before its first timed step.
        "model=tiny" if ctx.smoke else "model=maskrcnn_resnet50_fpn",
        f"data.image_size={s.gpu_image_size}",
        f"model.min_size={s.gpu_image_size}",  # square images: torchvision's resize leaves them as they are
        f"model.max_size={s.gpu_image_size}",
        f"data.num_train={count}",
        "data.num_val=1",
        f"trainer.batch_size={s.gpu_batch_size}",
    )
    train_set = build_datasets(cfg.data).train
    for index in range(len(train_set)):
        train_set[index]
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=s.gpu_batch_size, shuffle=False, collate_fn=collate, num_workers=0
    )
    batches = [engine.to_device(images, targets, device) for images, targets in loader]
    warm, timed = batches[:3], batches[3 : 3 + s.gpu_steps]
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    init = copy.deepcopy(model.state_dict())
    amp_dtype = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    amp_name = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    variants = {
        "fp32": (None, False),
        "fp32 channels_last": (None, True),
        f"AMP {amp_name}": (amp_dtype, False),
        f"AMP {amp_name} channels_last": (amp_dtype, True),
    }
    results: dict[str, dict[str, list[float]]] = {
        v: {"ips": [], "peak": [], "first": [], "last": []} for v in variants
    }

    def one(variant: str) -> None:
        dtype, channels_last = variants[variant]
        model.load_state_dict(init)
        net = (
            model.to(memory_format=torch.channels_last)
            if channels_last
            else model.to(memory_format=torch.contiguous_format)
        )
        optimizer = build_optimizer(cfg.optimizer, [p for p in net.parameters() if p.requires_grad])
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        options = engine.StepOptions(
            grad_clip_norm=cfg.trainer.grad_clip_norm, amp_dtype=dtype, log_every=10**9
        )
        losses: list[float] = []

        def on_log(step: int, values: dict[str, float]) -> None:
            losses.append(values["loss"])

        # A few loss reads for the trend (each one is a host sync, so not every step).
        step_options = engine.StepOptions(
            grad_clip_norm=options.grad_clip_norm, amp_dtype=dtype, log_every=max(1, len(timed) // 5)
        )
        detector = DivergenceDetector(**cfg.divergence)
        engine.train_one_epoch(net, optimizer, warm, device, 1, 0, detector, options, scaler=scaler)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        engine.train_one_epoch(
            net, optimizer, timed, device, 2, len(warm), detector, step_options, scaler=scaler, on_log=on_log
        )
        ctx.sync()
        seconds = time.perf_counter() - tic
        r = results[variant]
        r["ips"].append(len(timed) * s.gpu_batch_size / seconds)
        r["peak"].append(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
        k = max(1, len(losses) // 4)
        r["first"].append(statistics.mean(losses[:k]))
        r["last"].append(statistics.mean(losses[-k:]))
        log(f"fig6: {variant}: {r['ips'][-1]:.2f} images/s")

    for _, variant in interleaved(tuple(variants), 2 if not ctx.smoke else 1):
        one(variant)

    fig = Figure(
        "6",
        "GPU",
        f"maskrcnn_resnet50_fpn (random init) at {s.gpu_image_size}px, batch {s.gpu_batch_size}, "
        f"{s.gpu_steps} timed steps after 3 warm-up steps, engine.train_one_epoch with divergence checks, "
        f"device {device}",
    )
    for variant, r in results.items():
        fig.metrics[f"{variant} throughput"] = summary(r["ips"], "images/s")
        if cuda:
            fig.metrics[f"{variant} peak memory"] = summary(r["peak"], "GiB")
        fig.details[f"{variant} loss first/last quarter"] = [
            round(statistics.mean(r["first"]), 4),
            round(statistics.mean(r["last"]), 4),
        ]
    fp32 = max(statistics.median(results[v]["ips"]) for v in variants if v.startswith("fp32"))
    amp = max(statistics.median(results[v]["ips"]) for v in variants if v.startswith("AMP"))
    speedup = amp / fp32
    finite = all(math.isfinite(x) for r in results.values() for x in r["first"] + r["last"])
    trends = {v: statistics.mean(r["last"]) < statistics.mean(r["first"]) for v, r in results.items()}
    same_trend = len(set(trends.values())) == 1
    fig.metrics["AMP / fp32 throughput (best layout each)"] = summary([speedup], "x")
    fig.targets.append(
        Target(
            "AMP vs fp32 throughput",
            f">= {AMP_TARGET}x, finite losses, same trend",
            f"{speedup:.2f}x, finite={finite}, same trend={same_trend}",
            speedup >= AMP_TARGET and finite and same_trend,
        )
    )
    data_wait(ctx, fig, train_set, model, init, cfg, amp_dtype)
    return fig


def data_wait(ctx: Context, fig: Figure, train_set, model, init, cfg, amp_dtype) -> None:
    """Per-step time spent waiting for the next batch (data starvation), by DataLoader worker count."""
    import os

    import torch

    from masksweep import engine
    from masksweep.data import collate

    s = ctx.sizes
    device = ctx.torch_device()
    cuda = device.type == "cuda"
    model.load_state_dict(init)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    choices = sorted({0, min(4, os.cpu_count() or 1), min(8, os.cpu_count() or 1)})
    for workers in choices:
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=s.gpu_batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=cuda,
            persistent_workers=workers > 0,
        )
        waits, steps = [], 0
        for epoch in range(2):  # the first epoch starts the workers; the second is the steady state
            iterator = iter(loader)
            while True:
                tic = time.perf_counter()
                try:
                    images, targets = next(iterator)
                except StopIteration:
                    break
                wait = time.perf_counter() - tic
                images, targets = engine.to_device(images, targets, device)
                with torch.autocast(device.type, dtype=amp_dtype):
                    loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if cuda:
                    torch.cuda.synchronize()
                if epoch == 1:
                    waits.append(wait * 1000)
                steps += 1
                if steps >= 2 * (s.gpu_steps + 3):
                    break
        fig.metrics[f"data wait per step, {workers} workers (pinned={cuda})"] = summary(waits, "ms")
        del loader
