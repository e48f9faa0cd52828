"""A user's own dataset class, outside masksweep: plugged in by a yaml file naming it with `_target_`.

It follows the item contract of docs/layout.md ("Data") and nothing more: no annotation file, no
`coco_ground_truth()` (the evaluator then builds the ground truth from the targets), no `fingerprint()`.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors


class ShapesDataset(Dataset):
    """Non-square images of noise with one or two bright rectangles, each a "person"."""

    def __init__(self, split: str, *, num_images: int, width: int, height: int, seed: int = 0) -> None:
        self.split, self.num_images, self.width, self.height = split, num_images, width, height
        self.seed = seed * 1000 + ("train", "val", "test").index(split) * 100

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        generator = torch.Generator().manual_seed(self.seed + index)
        image = torch.rand(3, self.height, self.width, generator=generator) * 0.3
        count = 1 + index % 2
        masks = torch.zeros(count, self.height, self.width, dtype=torch.uint8)
        boxes = []
        for i in range(count):
            x0 = int(torch.randint(0, self.width // 2, (1,), generator=generator))
            y0 = int(torch.randint(0, self.height // 3, (1,), generator=generator))
            x1, y1 = x0 + self.width // 3, y0 + self.height // 2
            masks[i, y0:y1, x0:x1] = 1
            image[i % 3, y0:y1, x0:x1] = 0.9
            boxes.append([x0, y0, x1, y1])
        return tv_tensors.Image(image), {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(self.height, self.width)
            ),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.ones(count, dtype=torch.int64),
            "iscrowd": torch.zeros(count, dtype=torch.int64),
            "area": masks.sum(dim=(1, 2), dtype=torch.float32),
            "image_id": index + 1,
        }


class BrokenLabelsDataset(ShapesDataset):
    """Violates the contract: float labels."""

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image, target = super().__getitem__(index)
        return image, {**target, "labels": target["labels"].float()}
