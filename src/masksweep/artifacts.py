"""Pictures a trial leaves behind: val overlays with their instance-id maps, and the loss/AP curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masksweep.engine import predict
from masksweep.postprocess import colorize, instance_map, overlay


def save_overlays(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
    out_dir: Path,
    count: int,
    score_threshold: float,
    mask_threshold: float,
) -> list[Path]:
    """For the first `count` images: image | overlay | instance-id map, side by side, one PNG each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        (prediction,) = predict(model, [image], device)
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
