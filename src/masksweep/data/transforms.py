"""Pre-processing with torchvision.transforms.v2 on (tv_tensors.Image, target dict) pairs.

No resize here: the model's own GeneralizedRCNNTransform resizes (shorter side to `min_size`, longer side
capped at `max_size`, aspect ratio kept, batches padded), and its postprocess maps boxes and masks back to
each image's original size. Resizing here as well would stretch non-square images and put predictions in a
frame the source annotations do not use. The pipeline is split in two so that datasets can cache the
deterministic half:
- `prepare`: recompute areas from the masks, clamp and sanitize boxes (uint8 out);
- `augment`: the random and per-epoch part (horizontal flip for training), then conversion to float [0, 1].
No normalisation either: the model's transform normalises.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

Target = dict[str, Any]

# Per-instance tensors besides boxes and masks (SanitizeBoundingBoxes finds masks by itself).
_INSTANCE_FIELDS = ("labels", "iscrowd", "area")


def _instance_fields(inputs: tuple[tv_tensors.Image, Target]) -> tuple[torch.Tensor, ...]:
    target = inputs[1]
    return tuple(target[key] for key in _INSTANCE_FIELDS)


def _areas_from_masks(image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
    """Set `area` to the mask's pixel count, and empty the box of an instance whose mask is empty.

    Annotated areas are approximate for polygons; the IoU metrics and the documented item contract use the
    decoded pixels. An empty mask would train the mask head on nothing; emptying its box lets
    SanitizeBoundingBoxes drop it with its mask, label, crowd flag and area.
    """
    area = target["masks"].sum(dim=(1, 2), dtype=torch.float32)
    boxes = target["boxes"]
    emptied = tv_tensors.wrap(torch.where((area == 0)[:, None], 0.0, boxes), like=boxes)
    return image, dict(target, area=area, boxes=emptied)


def build_prepare() -> v2.Compose:
    """Deterministic half: its output may be cached and reused across epochs."""
    return v2.Compose(
        [
            _areas_from_masks,
            v2.ClampBoundingBoxes(),  # COCO boxes may poke past the border; Sanitize would drop them
            v2.SanitizeBoundingBoxes(labels_getter=_instance_fields),
        ]
    )


def build_augment(train: bool, hflip: float) -> v2.Compose:
    """Random half (train only) plus the float conversion the model expects."""
    steps: list[Any] = []
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    # A single dtype converts only images; masks stay uint8 and boxes float32.
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def make_target(boxes: torch.Tensor, masks: torch.Tensor, iscrowd: torch.Tensor, image_id: int) -> Target:
    """A target in the documented layout, sized to the masks' canvas. `prepare` adds `area` from the masks."""
    count, height, width = masks.shape
    return {
        "boxes": tv_tensors.BoundingBoxes(
            boxes.reshape(count, 4).to(torch.float32), format="XYXY", canvas_size=(height, width)
        ),
        "masks": tv_tensors.Mask(masks.to(torch.uint8)),
        "labels": torch.ones(count, dtype=torch.int64),
        "iscrowd": iscrowd.to(torch.int64),
        "image_id": image_id,
    }
