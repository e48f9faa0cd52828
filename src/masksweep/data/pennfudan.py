"""PennFudan-style layout: `root/PNGImages/<stem>.png` with `root/PedMasks/<stem>_mask.png`, whose pixel
values are instance ids (0 = background). Split into train, val and (optionally) test by seeded fractions.
There is no annotation file: the evaluation ground truth is built once per split from the masks, at
original resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes

from masksweep.data.base import (
    LoaderOptions,
    PersonDataset,
    Sample,
    check_fractions,
    existing_path,
    seeded_split,
)
from masksweep.data.images import header_size, read_label_map, read_rgb
from masksweep.data.transforms import make_target
from masksweep.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The category id of the ground truth and the exported predictions: there is no file to take one from.
PERSON_ID = 1


def _instance_masks(label_map: np.ndarray) -> np.ndarray:
    """(N, H, W) bool, one per non-zero value of the map, in increasing id order."""
    ids = np.unique(label_map)
    ids = ids[ids != 0]
    return label_map[None] == ids[:, None, None]


class PennFudanDataset(PersonDataset):
    """Given (image_id, path) pairs of a PennFudan-style root. No crowd regions; boxes come from masks."""

    def __init__(
        self,
        root: Path,
        images: list[tuple[int, Path]],
        options: LoaderOptions,
        *,
        train: bool,
    ) -> None:
        super().__init__(options, train=train)
        self.image_root = root / "PNGImages"
        self.image_ids: list[int] = []
        self.image_paths, self.mask_paths = [], []
        for image_id, image_path in images:
            mask_path = root / "PedMasks" / f"{image_path.stem}_mask.png"
            if not mask_path.is_file():
                raise DataError(
                    f"{image_path}: its mask {mask_path} does not exist; expected PedMasks/"
                    f"{image_path.stem}_mask.png for every image"
                )
            # Headers only, for every image: a mask of another size fails the run here, before the model.
            image_size, mask_size = header_size(image_path), header_size(mask_path)
            if mask_size != image_size:
                raise DataError(
                    f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image is "
                    f"{image_size[0]}x{image_size[1]}; expected the sizes to match"
                )
            # Emptiness is only known from the mask, so keep_empty=false reads the (small) masks up front.
            if not options.keep_empty and not (read_label_map(mask_path) != 0).any():
                self._drop("no person")
                continue
            self.image_ids.append(image_id)
            self.image_paths.append(image_path)
            self.mask_paths.append(mask_path)
        self.annotation_files = self.mask_paths
        self._ground_truth: dict[str, Any] | None = None

    def source_files(self, index: int) -> list[Path]:
        return [self.image_paths[index], self.mask_paths[index]]

    def _load_raw(self, index: int) -> Sample:
        image = read_rgb(self.image_paths[index])
        label_map = read_label_map(self.mask_paths[index])
        if label_map.shape != tuple(image.shape[-2:]):
            raise DataError(
                f"{self.mask_paths[index]}: mask is {label_map.shape[1]}x{label_map.shape[0]} but "
                f"its image is {image.shape[-1]}x{image.shape[-2]}; expected the sizes to match"
            )
        masks = torch.from_numpy(_instance_masks(label_map))
        boxes = masks_to_boxes(masks)
        boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel's index; the box must cover that pixel
        iscrowd = torch.zeros(len(masks), dtype=torch.int64)
        return image, make_target(boxes, masks, iscrowd, self.image_ids[index])

    def coco_ground_truth(self) -> dict[str, Any]:
        """Built on first use and kept: the masks are decoded once, not every evaluation."""
        if self._ground_truth is None:
            images, annotations = [], []
            for index, (image_id, mask_path) in enumerate(zip(self.image_ids, self.mask_paths, strict=True)):
                masks = _instance_masks(read_label_map(mask_path))
                height, width = masks.shape[-2:]
                images.append(
                    {
                        "id": image_id,
                        "file_name": self.image_paths[index].name,
                        "height": height,
                        "width": width,
                    }
                )
                rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
                for rle, area, box in zip(rles, mask_utils.area(rles), mask_utils.toBbox(rles), strict=True):
                    annotations.append(
                        {
                            "id": len(annotations) + 1,  # COCOeval reads id 0 as "unmatched"
                            "image_id": image_id,
                            "category_id": PERSON_ID,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                            "area": float(area),
                            "bbox": box.tolist(),
                            "iscrowd": 0,
                        }
                    )
            category = {"id": PERSON_ID, "name": "person", "supercategory": "person"}
            self._ground_truth = {"images": images, "annotations": annotations, "categories": [category]}
        return {**self._ground_truth, "annotations": [dict(a) for a in self._ground_truth["annotations"]]}


def pennfudan(
    split: str,
    *,
    root: str,
    val_fraction: float = 0.2,
    test: float | None = None,
    split_seed: int = 0,
    hflip: float = 0.5,
    keep_empty: bool = False,
    cache_images: bool = True,
) -> PennFudanDataset:
    """The `split` of a PennFudan-style folder; `test` is the fraction held out for a test split, or null."""
    expected = "a directory holding PNGImages/ and PedMasks/"
    root_path = existing_path(root, "data.root", expected, is_dir=True)
    for sub in ("PNGImages", "PedMasks"):
        if not (root_path / sub).is_dir():
            raise DataError(f"data.root={root!r}: {root_path} has no {sub}/ directory; expected {expected}")
    paths = sorted(p for p in (root_path / "PNGImages").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(
            f"{root_path / 'PNGImages'} holds no images; expected files ending in {IMAGE_SUFFIXES}"
        )
    test_fraction = check_fractions(val_fraction, test)
    if split == "test" and not test_fraction:
        raise ConfigError("data.test", test, "a fraction in (0, 1) to build a test split")
    # Ids are positions in the sorted listing, so an image keeps its id whatever the split.
    parts = seeded_split(list(enumerate(paths, start=1)), val_fraction, split_seed, test_fraction)
    chosen = dict(zip(("train", "val", "test"), parts, strict=True))[split]
    options = LoaderOptions.checked(hflip, keep_empty, cache_images)
    return PennFudanDataset(root_path, chosen, options, train=split == "train")
