"""The v2 pre-processing: no resize (the model resizes), flip, sanitize, float conversion."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from masksweep.data.transforms import build_augment, build_prepare, make_target


def _sample(height: int, width: int, boxes: list[list[float]], masks: torch.Tensor, image_id: int = 9):
    image = tv_tensors.Image(
        torch.arange(3 * height * width, dtype=torch.int64).reshape(3, height, width) % 251
    )
    image = tv_tensors.Image(image.to(torch.uint8))
    iscrowd = torch.zeros(len(boxes), dtype=torch.int64)
    return image, make_target(torch.tensor(boxes), masks, iscrowd, image_id)


def _rect(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return mask


def test_prepare_keeps_the_original_size_and_boxes_with_masks() -> None:
    # 20 wide, 10 tall stays 20 x 10: the model's own transform resizes, with the aspect ratio kept.
    masks = torch.stack([_rect(10, 20, (2, 6), (3, 11)), _rect(10, 20, (0, 10), (15, 20))])
    image, target = build_prepare()(*_sample(10, 20, [[3, 2, 11, 6], [15, 0, 20, 10]], masks))
    assert image.shape == (3, 10, 20) and image.dtype == torch.uint8
    assert torch.equal(target["masks"], masks)
    assert target["boxes"].tolist() == [[3, 2, 11, 6], [15, 0, 20, 10]]
    assert target["boxes"].canvas_size == (10, 20)
    mask_extents = masks_to_boxes(target["masks"]) + torch.tensor([0, 0, 1, 1])
    assert torch.equal(mask_extents, target["boxes"].as_subclass(torch.Tensor))
    assert target["area"].tolist() == [4.0 * 8.0, 10.0 * 5.0]  # from the masks, not annotated
    assert target["image_id"] == 9


def test_box_past_the_border_is_clamped_not_dropped() -> None:
    masks = _rect(16, 16, (0, 16), (10, 16))[None]
    _, target = build_prepare()(*_sample(16, 16, [[10, -0.5, 16.4, 16.2]], masks))
    assert target["boxes"].tolist() == [[10, 0, 16, 16]]


def test_degenerate_and_vanished_instances_are_dropped_in_sync() -> None:
    masks = torch.stack(
        [
            _rect(64, 64, (8, 40), (8, 40)),  # kept
            _rect(64, 64, (10, 20), (30, 30)),  # zero-width box and empty mask
            torch.zeros(64, 64, dtype=torch.uint8),  # an empty mask whose box is wide
        ]
    )
    image, target = _sample(64, 64, [[8, 8, 40, 40], [30, 10, 30, 20], [0, 0, 64, 64]], masks)
    target["iscrowd"] = torch.tensor([0, 0, 1])
    _, target = build_prepare()(image, target)
    assert target["boxes"].tolist() == [[8, 8, 40, 40]]
    assert target["masks"].shape == (1, 64, 64)
    assert target["labels"].tolist() == [1]
    assert target["iscrowd"].tolist() == [0]
    assert target["area"].tolist() == [32.0 * 32.0]


def test_flip_mirrors_image_boxes_and_masks_for_training_only() -> None:
    masks = _rect(8, 8, (1, 5), (0, 3))[None]
    image, target = build_prepare()(*_sample(8, 8, [[0, 1, 3, 5]], masks))

    flipped_image, flipped = build_augment(train=True, hflip=1.0)(image, target)
    assert flipped["boxes"].tolist() == [[5, 1, 8, 5]]
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert torch.allclose(flipped_image, image.flip(-1).to(torch.float32) / 255)

    val_image, val_target = build_augment(train=False, hflip=1.0)(image, target)
    assert val_target["boxes"].tolist() == [[0, 1, 3, 5]]
    assert torch.allclose(val_image, image.to(torch.float32) / 255)


def test_augment_outputs_float_image_and_leaves_targets_typed() -> None:
    masks = _rect(8, 8, (1, 5), (0, 3))[None]
    prepared = build_prepare()(*_sample(8, 8, [[0, 1, 3, 5]], masks))
    image, target = build_augment(train=True, hflip=0.5)(*prepared)
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].dtype == torch.float32
    assert target["area"].dtype == torch.float32
    assert prepared[0].dtype == torch.uint8  # the (cacheable) prepared sample is untouched
