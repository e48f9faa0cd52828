"""The performance-work checklist of issue 5, each measured as before (the naive way) vs after
(masksweep's way), side by side with interleaved repeats. Host syncs come from figure 1's count;
start-up from figure 4."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import Context, Figure, bench_env, interleaved, log, summary


def run(ctx: Context) -> Figure:
    s = ctx.sizes
    fig = Figure(
        "P",
        "Performance work: before / after",
        f"{s.train_image_size}px synthetic data, tiny preset, {s.perf_repeats} interleaved repeats each",
    )
    caching(ctx, fig)
    workers(ctx, fig)
    encoding(ctx, fig)
    logging_(ctx, fig)
    imports(ctx, fig)
    return fig


def caching(ctx: Context, fig: Figure) -> None:
    """Decoded-image caching (data.cache_images): every train item, decode+resize vs from the cache."""
    from masksweep.data import build_datasets

    s = ctx.sizes
    sets = {}
    for cached in (False, True):
        cfg = ctx.compose(f"data.image_size={s.train_image_size}", f"data.cache_images={str(cached).lower()}")
        sets[cached] = build_datasets(cfg.data).train
    for index in range(len(sets[True])):
        sets[True][index]  # the first epoch fills the cache; later epochs read it
    seconds: dict[str, list[float]] = {"decode every epoch": [], "cached": []}
    for _, variant in interleaved(tuple(seconds), s.perf_repeats):
        dataset = sets[variant == "cached"]
        tic = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        seconds[variant].append((time.perf_counter() - tic) / len(dataset) * 1000)
    for variant, values in seconds.items():
        fig.metrics[f"data item, {variant}"] = summary(values, "ms/image")
    speedup = [a / b for a, b in zip(seconds["decode every epoch"], seconds["cached"], strict=True)]
    fig.metrics["data item speed-up from caching"] = summary(speedup, "x")


def workers(ctx: Context, fig: Figure) -> None:
    """Persistent workers (num_workers > 0): three epochs of loading, workers re-forked each epoch vs kept."""
    import torch

    from masksweep.data import build_datasets, collate

    s = ctx.sizes
    cfg = ctx.compose(f"data.image_size={s.train_image_size}")
    dataset = build_datasets(cfg.data).train
    epochs = 3
    seconds: dict[str, list[float]] = {"workers re-forked per epoch": [], "persistent workers": []}
    for _, variant in interleaved(tuple(seconds), s.perf_repeats):
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.trainer.batch_size,
            shuffle=True,
            num_workers=2,
            collate_fn=collate,
            persistent_workers=variant == "persistent workers",
        )
        tic = time.perf_counter()
        for _ in range(epochs):
            for _batch in loader:
                pass
        seconds[variant].append((time.perf_counter() - tic) / epochs)
        del loader
    for variant, values in seconds.items():
        fig.metrics[f"loader epoch (2 workers), {variant}"] = summary(values, "s/epoch")
    fig.notes.append(
        "Persistent workers keep their processes and their decoded-image caches across epochs; re-forked "
        "workers start empty and decode every image again. masksweep's default on a 2-core CPU is still "
        "num_workers=0 (the main process is faster there), which the cache alone serves."
    )


def encoding(ctx: Context, fig: Figure) -> None:
    """Mask encoding: one pycocotools call for all of an image's masks vs one call per mask."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_util

    from masksweep.metrics import _encode

    s = ctx.sizes
    size = s.eval_image_size
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand((30, size, size), generator=generator) > 0.7 for _ in range(8)]
    # Realistic shapes: blobs, not noise (RLE cost grows with the number of runs).
    images = [torch.nn.functional.avg_pool2d(m[:, None].float(), 9, 1, 4)[:, 0] > 0.5 for m in images]

    def per_mask(binary: torch.Tensor) -> list:
        rles = [
            mask_util.encode(np.array(mask[:, :, np.newaxis], dtype=np.uint8, order="F"))[0]
            for mask in binary
        ]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")
        return rles

    seconds: dict[str, list[float]] = {"one call per mask": [], "batched (masksweep)": []}
    for _, variant in interleaved(tuple(seconds), s.perf_repeats):
        function = per_mask if variant == "one call per mask" else _encode
        tic = time.perf_counter()
        for _ in range(5):
            for binary in images:
                function(binary)
        seconds[variant].append((time.perf_counter() - tic) / (5 * len(images)) * 1000)
    assert [r["counts"] for r in per_mask(images[0])] == [r["counts"] for r in _encode(images[0])]
    for variant, values in seconds.items():
        fig.metrics[f"RLE-encode 30 masks {size}px, {variant}"] = summary(values, "ms/image")


def logging_(ctx: Context, fig: Figure) -> None:
    """Metric logging: one MLflow call per value vs MLflowTracker's batches (log_batch)."""
    from masksweep.tracking import MLflowTracker, experiment_id, open_client

    s = ctx.sizes
    store = ctx.workdir / "perf-logging"
    store.mkdir(parents=True, exist_ok=True)
    client, _ = open_client(f"sqlite:///{store / 'mlflow.db'}")
    exp = experiment_id(client, "bench-logging", (store / "artifacts").as_uri())
    keys = (
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss",
        "lr",
    )
    steps = 20
    seconds: dict[str, list[float]] = {"log_metric per value": [], "batched (MLflowTracker)": []}
    for repeat, variant in interleaved(tuple(seconds), s.perf_repeats):
        run_id = client.create_run(exp, run_name=f"{variant}-{repeat}").info.run_id
        tracker = MLflowTracker(client, run_id)
        tic = time.perf_counter()
        for step in range(steps):
            values = {f"train/{k}": 1.0 / (step + 1) for k in keys}
            if variant == "log_metric per value":
                for key, value in values.items():
                    client.log_metric(run_id, key, value, step=step)
            else:
                tracker.log_metrics(values, step)
        tracker.flush()
        seconds[variant].append((time.perf_counter() - tic) / steps * 1000)
    for variant, values in seconds.items():
        fig.metrics[f"log 7 step metrics to SQLite, {variant}"] = summary(values, "ms/logged step")


def imports(ctx: Context, fig: Figure) -> None:
    """Lazy imports: what `import masksweep.train` (every masksweep-train starts with it) loads, and when."""
    code = (
        "import time, sys, json; t = time.perf_counter(); import masksweep.train; "
        "t = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'scipy', 'mlflow', 'optuna', 'faster_coco_eval', 'pycocotools', "
        "'matplotlib', 'sqlalchemy') if m in sys.modules]; print(json.dumps([t, heavy]))"
    )
    times, heavy = [], []
    for _ in range(max(1, ctx.sizes.startup_repeats)):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=bench_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(seconds)
    fig.metrics["import masksweep.train"] = summary(times, "s")
    fig.details["modules_loaded_by_import_masksweep_train"] = heavy
    log(f"perf: import masksweep.train {times} loads {heavy}")
