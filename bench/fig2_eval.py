"""Figure 2: evaluation.

(a) AP only: masksweep's COCOEvaluator.evaluate() (bbox + segm through faster-coco-eval) against pycocotools'
    COCOeval on the same ground truth and predictions; identical AP required to 1e-9.
(b) The whole evaluation: `engine.evaluate` (inference, thresholding, batched RLE encoding, AP, IoUs) against
    a torchvision-references-style evaluation (pasted full masks encoded one by one with pycocotools, GT
    converted the same way, pycocotools COCOeval). Both share the model's inference, timed alone as well.
"""

from __future__ import annotations

import time

from bench.common import Context, Figure, Target, interleaved, log, summary
from bench.evalref import AP_KEYS, inference_only, pycocotools_ap, reference_evaluate, synthetic_outputs

SPEEDUP_TARGET = 3.0
AP_TOLERANCE = 1e-9


def val_items(ctx: Context, image_size: int, count: int) -> list:
    from masksweep.data import build_datasets

    cfg = ctx.compose(f"data.image_size={image_size}", f"data.num_val={count}", "data.num_train=1")
    val_set = build_datasets(cfg.data).val
    return [val_set[i] for i in range(len(val_set))]


def processed_evaluator(items: list, backend: str = "faster_coco_eval"):
    """A COCOEvaluator holding `items`' ground truth and synthetic predictions (untimed set-up)."""
    from masksweep.metrics import COCOEvaluator

    evaluator = COCOEvaluator(backend)
    targets = [target for _, target in items]
    outputs = [synthetic_outputs(target, seed=int(target["image_id"])) for target in targets]
    evaluator.process(targets, outputs)
    return evaluator, targets, outputs


def run(ctx: Context) -> Figure:
    s = ctx.sizes
    fig = Figure(
        "2",
        "Evaluation",
        f"(a) {s.ap_images} synthetic val images at {s.eval_image_size}px, 30 predictions each (jittered "
        f"ground truth + false positives), {s.ap_repeats} interleaved repeats; (b) {s.eval_images} val "
        "images through "
        f"the tiny model (random init, 30 detections per image), {s.eval_repeats} interleaved repeats, "
        f"device {ctx.device}",
    )
    ap_part(ctx, fig)
    whole_part(ctx, fig)
    return fig


def ap_part(ctx: Context, fig: Figure) -> None:
    s = ctx.sizes
    items = val_items(ctx, s.eval_image_size, s.ap_images)
    evaluator, targets, outputs = processed_evaluator(items)
    gt_dict, results = evaluator.ground_truth(), evaluator.results()
    seconds: dict[str, list[float]] = {"masksweep": [], "pycocotools": []}
    values: dict[str, dict[str, float]] = {}
    for _, variant in interleaved(tuple(seconds), s.ap_repeats):
        tic = time.perf_counter()
        if variant == "masksweep":
            values[variant] = evaluator.evaluate()
        else:
            values[variant] = pycocotools_ap(gt_dict, results)
        seconds[variant].append(time.perf_counter() - tic)
    speedup = [p / m for m, p in zip(seconds["masksweep"], seconds["pycocotools"], strict=True)]
    diff = max(abs(values["masksweep"][k] - values["pycocotools"][k]) for k in AP_KEYS)
    log(
        f"fig2a: AP masksweep {seconds['masksweep']} pycocotools {seconds['pycocotools']} max|dAP| {diff:.2e}"
    )
    fig.metrics["AP: masksweep (faster-coco-eval)"] = summary(seconds["masksweep"], "s")
    fig.metrics["AP: pycocotools COCOeval"] = summary(seconds["pycocotools"], "s")
    fig.metrics["AP speed-up vs pycocotools"] = summary(speedup, "x")
    fig.metrics["AP max |difference|"] = summary([diff], "AP")
    fig.details["ap_values"] = values
    fig.details["ap_detections"] = len(results)
    post_part(ctx, fig, targets, outputs)
    median = fig.metrics["AP speed-up vs pycocotools"]["median"]
    fig.targets.append(
        Target(
            "AP speed-up vs pycocotools", f">= {SPEEDUP_TARGET}x", round(median, 2), median >= SPEEDUP_TARGET
        )
    )
    fig.targets.append(
        Target(
            "AP identical to pycocotools", f"<= {AP_TOLERANCE:g}", float(f"{diff:.3g}"), diff <= AP_TOLERANCE
        )
    )


def post_part(ctx: Context, fig: Figure, targets: list, outputs: list) -> None:
    """Everything after inference, on the same outputs: masksweep's evaluator (threshold, batched encoding,
    IoUs, AP) vs the reference's (per-mask encoding of predictions and ground truth, pycocotools)."""
    from bench.evalref import reference_scores
    from masksweep.metrics import COCOEvaluator

    evaluator = COCOEvaluator()
    seconds: dict[str, list[float]] = {"masksweep": [], "reference": []}
    for _, variant in interleaved(tuple(seconds), ctx.sizes.ap_repeats):
        tic = time.perf_counter()
        if variant == "masksweep":
            evaluator.reset()
            evaluator.process(targets, outputs)
            evaluator.evaluate()
        else:
            reference_scores(targets, outputs)
        seconds[variant].append(time.perf_counter() - tic)
    n = len(targets)
    fig.metrics["after inference: masksweep (encode, IoUs, AP)"] = summary(
        [t / n * 1000 for t in seconds["masksweep"]], "ms/image"
    )
    fig.metrics["after inference: reference-style (encode, AP)"] = summary(
        [t / n * 1000 for t in seconds["reference"]], "ms/image"
    )
    fig.metrics["after-inference speed-up vs reference"] = summary(
        [r / m for m, r in zip(seconds["masksweep"], seconds["reference"], strict=True)], "x"
    )


def whole_part(ctx: Context, fig: Figure) -> None:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from masksweep import engine
    from masksweep.data import build_datasets
    from masksweep.metrics import COCOEvaluator
    from masksweep.train import make_loader, seed_everything

    s = ctx.sizes
    cfg = ctx.compose(
        f"data.image_size={s.eval_image_size}", f"data.num_val={s.eval_images}", "data.num_train=1"
    )
    generator = seed_everything(cfg.seed)
    val_set = build_datasets(cfg.data).val
    for index in range(len(val_set)):
        val_set[index]  # warm the decoded-image cache, as every epoch after the first sees it
    loader = make_loader(val_set, cfg, train=False, generator=generator)
    device = ctx.torch_device()
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    evaluator = COCOEvaluator(cfg.eval.backend, cfg.eval.score_threshold, cfg.eval.mask_threshold)

    variants = ("masksweep", "reference", "inference only")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    engine.evaluate(model, loader, device, evaluator)  # warm-up
    for _, variant in interleaved(variants, s.eval_repeats):
        ctx.sync()
        tic = time.perf_counter()
        if variant == "masksweep":
            engine.evaluate(model, loader, device, evaluator)
        elif variant == "reference":
            reference_evaluate(model, loader, device)
        else:
            inference_only(model, loader, device)
        ctx.sync()
        seconds[variant].append(time.perf_counter() - tic)
    log(f"fig2b: {seconds}")
    ratio = [r / m for m, r in zip(seconds["masksweep"], seconds["reference"], strict=True)]
    n = len(val_set)
    fig.metrics["evaluate: masksweep"] = summary([t / n * 1000 for t in seconds["masksweep"]], "ms/image")
    fig.metrics["evaluate: reference-style"] = summary(
        [t / n * 1000 for t in seconds["reference"]], "ms/image"
    )
    fig.metrics["evaluate: inference alone"] = summary(
        [t / n * 1000 for t in seconds["inference only"]], "ms/image"
    )
    fig.metrics["evaluate speed-up (whole)"] = summary(ratio, "x")
    # Where masksweep's non-inference time goes, once, on the same outputs.
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images += batch_images
        targets += batch_targets
    outputs = engine.predict(model, images, device)
    breakdown = {}
    tic = time.perf_counter()
    evaluator.reset()
    evaluator.process(targets, outputs)
    breakdown["process (threshold, encode, IoU) ms/image"] = (time.perf_counter() - tic) / n * 1000
    tic = time.perf_counter()
    evaluator.evaluate()
    breakdown["evaluate (AP) ms/image"] = (time.perf_counter() - tic) / n * 1000
    breakdown["detections per image"] = sum(len(o["scores"]) for o in outputs) / n
    fig.details["masksweep_breakdown"] = {k: round(v, 3) for k, v in breakdown.items()}
    fig.details["evaluate_seconds"] = seconds
    fig.notes.append(
        "Both whole evaluations run the same model forward, which dominates on the CPU (compare 'inference "
        "alone'), so their ratio stays near 1; the 'after inference' rows compare what differs, on the (a) "
        "set's outputs. masksweep also computes the three IoU metrics that the reference does not."
    )
    del torch
