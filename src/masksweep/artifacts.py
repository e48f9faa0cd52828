"""Pictures a trial leaves behind: val overlays with their instance-id maps, and the loss/AP curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masksweep.postprocess import colorize, instance_map, overlay


class OverlaySamples:
    """An `engine.evaluate` hook that keeps the first `count` (image, target, output) triples it sees."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.samples: list[tuple[torch.Tensor, dict, dict]] = []

    def __call__(self, images: list[torch.Tensor], targets: list[dict], outputs: list[dict]) -> None:
        for sample in zip(images, targets, outputs, strict=True):
            if len(self.samples) < self.count:
                self.samples.append(sample)


def save_overlays(
    samples: Sequence[tuple[torch.Tensor, dict, dict]],
    out_dir: Path,
    score_threshold: float,
    mask_threshold: float,
) -> list[Path]:
    """For each (image, target, prediction): image | overlay | instance-id map, side by side, one PNG each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, target, prediction in samples:
        ids = instance_map(prediction, score_threshold=score_threshold, mask_threshold=mask_threshold)
        rgb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        panel = np.concatenate([rgb, overlay(rgb, ids), colorize(ids)], axis=1)
        path = out_dir / f"val_{int(target['image_id']):06d}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    return paths


def save_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Mean train loss and val AP per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train/epoch_loss"] for row in history], marker="o", label="loss")
    ax_loss.plot(
        epochs, [row["train/epoch_loss_classifier"] for row in history], marker="o", label="loss_classifier"
    )
    ax_loss.set(xlabel="epoch", ylabel="mean train loss", yscale="log", title="training loss")
    ax_loss.legend()
    for key in ("val/ap_bbox", "val/ap_segm", "val/iou_global"):
        ax_ap.plot(epochs, [row[key] for row in history], marker="o", label=key.removeprefix("val/"))
    ax_ap.set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
