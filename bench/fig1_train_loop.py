"""Figure 1: training-loop efficiency.

Three loops over the same model initialisation, measured side by side (interleaved repeats):
- masksweep: `engine.train_one_epoch` with the default divergence checks and an MLflowTracker logging through
  `on_log` into a temporary SQLite store (flushed at the end, as train() does after each epoch);
- bare: the same pre-loaded batches, forward, loss sum, backward, optimizer step, nothing else;
- tutorial: torchvision's fine-tuning tutorial loop: a DataLoader over the dataset, loss sum, `.item()` per
  step, step.

masksweep runs with grad_clip_norm=None: `clip_grad_norm_` with an infinite max norm does the same work as a
real clip (the norm, which the divergence detector needs, and a multiply by 1.0) but leaves the gradients
unchanged, so all loops follow the same trajectory and do the same model work.
"""

from __future__ import annotations

import copy
import statistics
import time

from bench.common import Context, Figure, Target, interleaved, log, summary

VARIANTS = ("masksweep", "bare", "tutorial")
TARGET = 0.97


def run(ctx: Context) -> Figure:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench.syncs import SyncCounter
    from masksweep import engine
    from masksweep.data import build_datasets, collate
    from masksweep.divergence import DivergenceDetector
    from masksweep.optim import build_optimizer
    from masksweep.tracking import MLflowTracker, experiment_id, open_client
    from masksweep.train import make_loader, seed_everything

    s = ctx.sizes
    cfg = ctx.compose(f"data.image_size={s.train_image_size}")
    device = ctx.torch_device()
    steps = s.train_steps
    batch_size = cfg.trainer.batch_size

    generator = seed_everything(cfg.seed)
    train_set = build_datasets(cfg.data).train
    for index in range(len(train_set)):  # fill the decoded-image cache: every loop reads warm data
        train_set[index]
    loader = make_loader(train_set, cfg, train=True, generator=generator)
    batches = []
    for images, targets in loader:
        batches.append(engine.to_device(images, targets, device))
        if len(batches) == steps:
            break
    steps = len(batches)

    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    init = copy.deepcopy(model.state_dict())

    def fresh_optimizer() -> torch.optim.Optimizer:
        model.load_state_dict(init)
        model.train()
        return build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])

    def warm_detector() -> DivergenceDetector:
        # Past its warm-up, so every timed step runs the full set of checks (median rule included).
        detector = DivergenceDetector(**cfg.divergence)
        for step in range(detector.warmup_steps):
            detector.update(step + 1, torch.tensor(5.0, device=device))
        return detector

    store = ctx.workdir / "fig1"
    store.mkdir(parents=True, exist_ok=True)
    client, _ = open_client(f"sqlite:///{store / 'mlflow.db'}")
    exp = experiment_id(client, "bench-fig1", (store / "artifacts").as_uri())
    tracker = MLflowTracker(client, client.create_run(exp, run_name="fig1").info.run_id)

    def on_log(step: int, values: dict[str, float]) -> None:  # exactly what train() passes
        tracker.log_metrics({f"train/{k}": v for k, v in values.items()}, step)

    options = engine.StepOptions(
        grad_clip_norm=None,
        amp_dtype=None,
        log_every=cfg.trainer.log_every_n_steps,
        limit_batches=None,
        progress=False,
    )
    global_step = [0]

    def masksweep_loop(data: list) -> None:
        optimizer = fresh_optimizer()
        detector = warm_detector()
        ctx.sync()
        tic = time.perf_counter()
        _, end = engine.train_one_epoch(
            model, optimizer, data, device, 1, global_step[0], detector, options, on_log=on_log
        )
        tracker.flush()
        ctx.sync()
        global_step[0] = end
        return time.perf_counter() - tic

    def bare_loop(data: list) -> float:
        optimizer = fresh_optimizer()
        ctx.sync()
        tic = time.perf_counter()
        for images, targets in data:
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        ctx.sync()
        return time.perf_counter() - tic

    def tutorial_loop(n_steps: int) -> float:
        optimizer = fresh_optimizer()
        data_loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=batch_size,
            shuffle=True,
            num_workers=cfg.trainer.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        ctx.sync()
        tic = time.perf_counter()
        for i, (images, targets) in enumerate(data_loader):
            if i == n_steps:
                break
            images = [image.to(device) for image in images]
            targets = [
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets
            ]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            losses.item()  # the tutorial prints/checks it every step
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
        ctx.sync()
        return time.perf_counter() - tic

    log(f"fig1: warm-up ({device}, {s.train_image_size}px, batch {batch_size})")
    masksweep_loop(batches[:1])
    bare_loop(batches[:1])
    tutorial_loop(1)

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat, variant in interleaved(VARIANTS, s.train_repeats):
        if variant == "masksweep":
            seconds[variant].append(masksweep_loop(batches))
        elif variant == "bare":
            seconds[variant].append(bare_loop(batches))
        else:
            seconds[variant].append(tutorial_loop(steps))
        log(f"fig1: repeat {repeat + 1}/{s.train_repeats} {variant}: {seconds[variant][-1]:.2f}s")

    images = steps * batch_size
    vs_bare = [b / m for m, b in zip(seconds["masksweep"], seconds["bare"], strict=True)]
    vs_tutorial = [t / m for m, t in zip(seconds["masksweep"], seconds["tutorial"], strict=True)]

    # Host syncs added by masksweep's loop code, over a window that holds one logging step.
    counter = SyncCounter()
    optimizer = fresh_optimizer()
    hooks = counter.attach(model, optimizer)
    detector = warm_detector()
    log_every = options.log_every
    start = log_every - 1  # the window starts with a logging step
    with counter:
        engine.train_one_epoch(model, optimizer, batches, device, 1, start, detector, options, on_log=on_log)
    for hook in hooks:
        hook.remove()
    tracker.flush()
    syncs = sum(n for site, n in counter.counts.items() if not counter.epoch_end(site))

    overhead_ms = isolated_overhead(
        model, batches[0], detector_factory=warm_detector, tracker=tracker, on_log=on_log, log_every=log_every
    )
    client.set_terminated(tracker.run_id, "FINISHED")
    bare_step_ms = statistics.median(seconds["bare"]) / steps * 1000

    fig = Figure(
        "1",
        "Training-loop efficiency",
        f"tiny preset (ResNet-18 FPN Mask R-CNN), {s.train_image_size}px synthetic images, "
        f"batch {batch_size}, {steps} pre-loaded batches per variant and repeat, "
        f"{s.train_repeats} interleaved repeats, "
        f"device {device}, SGD; masksweep: divergence checks on (sync_every={cfg.divergence.sync_every}), "
        f"MLflowTracker on SQLite, log_every_n_steps={log_every}",
    )
    for variant in VARIANTS:
        fig.metrics[f"{variant} throughput"] = summary([images / t for t in seconds[variant]], "images/s")
    fig.metrics["masksweep / bare throughput"] = summary(vs_bare, "ratio")
    fig.metrics["masksweep / tutorial throughput"] = summary(vs_tutorial, "ratio")
    fig.metrics["masksweep host syncs per step (loop code, epoch end excluded)"] = summary(
        [syncs / steps], "syncs/step"
    )
    fig.metrics["masksweep loop-code overhead per step, isolated"] = summary(overhead_ms, "ms")
    expected = [bare_step_ms / (bare_step_ms + o) for o in overhead_ms]
    fig.metrics["masksweep / bare expected from the isolated overhead"] = summary(expected, "ratio")
    fig.details["sync_counts"] = {"steps": steps, "first_step": start + 1, **dict(counter.counts)}
    fig.details["seconds"] = seconds
    median = fig.metrics["masksweep / bare throughput"]["median"]
    fig.targets.append(
        Target("masksweep vs bare loop throughput", f">= {TARGET}", round(median, 4), median >= TARGET)
    )
    fig.notes.append(
        "The loop-code overhead is also timed alone (low noise): the masksweep-only work of a step (loss "
        "stack and sums, gradient norm, divergence update, 1/log_every of a metric log and flush) on the "
        f"model's real gradients, against the bare loop's median step of {bare_step_ms:.0f} ms."
    )
    fig.notes.append(
        f"Host syncs in masksweep's loop code over steps {start + 1}-{start + steps} (model forward and "
        "optimizer step excluded), by call site: "
        + ("; ".join(f"{site}: {n}" for site, n in sorted(counter.counts.items())) or "none")
        + f". The divergence check reads one small tensor every {cfg.divergence.sync_every} steps and the "
        f"logger one every {log_every} steps (the first step of the window is a logging step); none per step."
    )
    return fig


def isolated_overhead(model, batch, detector_factory, tracker, on_log, log_every: int, repeats: int = 5):
    """ms per step of what train_one_epoch adds to a bare step, timed without the model's forward/backward:
    the loss stack and running sums, the gradient norm, the divergence update (with its periodic host check)
    and, amortised over log_every steps, one metric log and a flush of the batched tracker."""
    import torch

    from masksweep import engine

    images, targets = batch
    model.train()
    loss_dict = model(images, targets)
    sum(loss_dict.values()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for repeat in range(repeats):
        detector = detector_factory()
        sums = torch.zeros(len(engine.STEP_KEYS))
        n = 4 * detector.sync_every
        tic = time.perf_counter()
        for step in range(n):
            losses = torch.stack([loss_dict[k].detach() for k in engine.LOSS_KEYS]).float()
            total = losses.sum()
            grad_norm = engine._grad_norm(params, None, detector.enabled)
            step_values = torch.cat([losses, total[None]])
            sums += step_values
            detector.update(step + 1, total, grad_norm)
        per_step = (time.perf_counter() - tic) / n
        tic = time.perf_counter()
        values = dict(zip(engine.STEP_KEYS, step_values.tolist(), strict=True))
        values["lr"] = 0.001
        on_log(10**6 + repeat, values)
        tracker.flush()
        per_log = time.perf_counter() - tic
        results.append((per_step + per_log / log_every) * 1000)
    model.zero_grad(set_to_none=True)
    return results
