"""The item contract of docs/layout.md "Data", checked on a dataset's items with a one-line error.

Hand-written: no library validates a (tv_tensors.Image, target dict) pair against torchvision's detection
target format; the model itself fails deep inside its forward pass, far from the dataset at fault.
"""

from __future__ import annotations

from typing import Any

import torch

from masksweep.errors import DataError

_INSTANCE_FIELDS = {"labels": torch.int64, "iscrowd": torch.int64, "area": torch.float32}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {type(value).__name__} of dtype {dtype}, shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def item_problem(item: Any) -> str | None:
    """What is wrong with one `(image, target)` item, as "field: found; expected ...", or None if nothing."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return f"item: {_describe(item)}; expected an (image, target) pair"
    image, target = item
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.float32
        or image.ndim != 3
        or image.shape[0] != 3
    ):
        return f"image: {_describe(image)}; expected float32 (3, H, W) RGB in [0, 1]"
    if image.numel() and (image.min() < 0 or image.max() > 1):
        return (
            f"image: values in [{float(image.min()):g}, {float(image.max()):g}]; expected float32 in [0, 1]"
        )
    if not isinstance(target, dict):
        return f"target: {_describe(target)}; expected a dict"
    missing = [k for k in ("boxes", "masks", "labels", "iscrowd", "area", "image_id") if k not in target]
    if missing:
        return f"target[{missing[0]!r}]: missing; expected boxes, masks, labels, iscrowd, area and image_id"
    boxes, masks = target["boxes"], target["masks"]
    if (
        not isinstance(boxes, torch.Tensor)
        or boxes.dtype != torch.float32
        or boxes.ndim != 2
        or boxes.shape[1] != 4
    ):
        return f"target['boxes']: {_describe(boxes)}; expected float32 (N, 4) XYXY boxes"
    box_format = getattr(boxes, "format", None)
    if box_format is not None and box_format.name != "XYXY":
        return f"target['boxes']: format {box_format.name}; expected XYXY"
    count, height, width = len(boxes), *image.shape[-2:]
    if (
        not isinstance(masks, torch.Tensor)
        or masks.dtype != torch.uint8
        or tuple(masks.shape) != (count, height, width)
    ):
        expected = f"uint8 ({count}, {height}, {width}): one mask per box, at the image's size"
        return f"target['masks']: {_describe(masks)}; expected {expected}"
    for key, dtype in _INSTANCE_FIELDS.items():
        value = target[key]
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != (count,):
            expected = f"{str(dtype).removeprefix('torch.')} ({count},)"
            return f"target[{key!r}]: {_describe(value)}; expected {expected}"
    if count and not bool((target["labels"] == 1).all()):
        return "target['labels']: values other than 1; expected 1 (person) for every instance"
    image_id = target["image_id"]
    if isinstance(image_id, torch.Tensor) and image_id.numel() == 1:
        image_id = image_id.item()
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        return f"target['image_id']: {_describe(image_id)}; expected an int"
    return None


def check_item(item: Any, where: str) -> None:
    """DataError naming `where` (dataset, split, item index) and the violated field."""
    problem = item_problem(item)
    if problem is not None:
        raise DataError(f'{where}: {problem} (the item contract in docs/layout.md, "Data")')
