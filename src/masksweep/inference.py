"""A trained model from a checkpoint, and predictions on image files: instance maps, overlays, COCO JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from masksweep.checkpoint import load
from masksweep.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class TrainedModel:
    model: torch.nn.Module  # resizes its inputs itself and maps its outputs back to each image's size
    config: dict[str, Any]


def load_trained(path: Path, device: torch.device) -> TrainedModel:
    """Rebuild the checkpoint's architecture (no download, no pretraining) and load its weights."""
    from omegaconf import OmegaConf

    from masksweep.model import build_model

    state = load(path, key="--checkpoint")
    spec = {k: v for k, v in state["model_config"].items() if not k.startswith("_")}
    model = build_model(**{**spec, "weights_backbone": None}, read_weights=False)  # as trained, nothing read
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # e.g. a checkpoint from an older version of the architecture
        detail = " ".join(str(exc).split())[:240]  # one line, naming the first mismatching keys
        raise ConfigError(
            "--checkpoint", str(path), f"a checkpoint of {spec['arch']} as built now ({detail})"
        ) from exc
    config = OmegaConf.to_container(OmegaConf.create(state["config"]))
    return TrainedModel(model.to(device).eval(), config)


def find_images(inputs: Iterable[Path]) -> list[Path]:
    """Image files among `inputs`; folders are searched recursively."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"input {item} does not exist; expected image files or folders")
    return found


@dataclass
class PredictSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _save_instance_map(ids: np.ndarray, path: Path) -> None:
    # PNG holds 8-bit greyscale up to 255 instances and 16-bit beyond; ids are never rescaled.
    Image.fromarray(ids.astype(np.uint16) if ids.dtype != np.uint8 else ids).save(path)


def predict_files(
    trained: TrainedModel,
    paths: Sequence[Path],
    out_dir: Path,
    device: torch.device,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    batch_size: int = 4,
    progress: bool = True,
) -> PredictSummary:
    """Write NAME_instances.png, NAME_overlay.png per image and one predictions.json (COCO results).

    Images go to the model at their own size; its transform resizes them as in training (aspect kept) and
    maps boxes and masks back, so every output is at the image's original resolution. predictions.json uses
    category id 1 (person) and image ids 1..N, which image_ids.json maps to the files."""
    from tqdm.auto import tqdm

    from masksweep.data.images import read_rgb
    from masksweep.engine import predict
    from masksweep.metrics import coco_results
    from masksweep.postprocess import instance_map, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    to_float = v2.ToDtype(torch.float32, scale=True)
    summary, results, image_ids = PredictSummary(), [], {}
    bar = tqdm(total=len(paths), desc="predict", disable=not progress, unit="img")
    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append((path, read_rgb(path)))
            except DataError as exc:
                log.warning("skipping %s: %s", path, exc)
                summary.skipped.append((path, str(exc)))
                bar.update()
        if not batch:
            continue
        outputs = predict(trained.model, [to_float(image) for _, image in batch], device)
        for (path, image), output in zip(batch, outputs, strict=True):
            ids = instance_map(output, score_threshold=score_threshold, mask_threshold=mask_threshold)
            stem = out_dir / path.stem
            _save_instance_map(ids, stem.with_name(f"{path.stem}_instances.png"))
            Image.fromarray(overlay(image.permute(1, 2, 0).numpy(), ids)).save(
                stem.with_name(f"{path.stem}_overlay.png")
            )
            image_id = len(image_ids) + 1
            image_ids[image_id] = str(path)
            keep = output["scores"] >= score_threshold
            kept = {k: v[keep] for k, v in output.items()}
            results.extend(coco_results(image_id, kept, kept["masks"][:, 0] > mask_threshold))
            summary.written.append(path)
            bar.update()
    bar.close()
    (out_dir / "predictions.json").write_text(json.dumps(results))
    # COCO results carry only image ids; this says which file each id is.
    (out_dir / "image_ids.json").write_text(json.dumps(image_ids, indent=1))
    return summary
