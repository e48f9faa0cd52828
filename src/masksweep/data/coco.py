"""COCO-format person instances: the loader the synthetic data goes through as well.

Annotations are filtered to one category chosen by name (ids are not assumed contiguous). Crowd regions are
left out of training targets and kept, with iscrowd=1, for evaluation.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from pycocotools import mask as mask_utils

from masksweep.data.base import LoaderOptions, PersonDataset, Sample, existing_path, seeded_split
from masksweep.data.images import read_rgb
from masksweep.data.transforms import make_target
from masksweep.errors import ConfigError, DataError

Annotation = dict[str, Any]


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    height: int
    width: int


@dataclass(frozen=True)
class CocoIndex:
    """One parsed annotation file: its images and, per image id, the annotations of the chosen category."""

    ann_file: Path
    image_root: Path
    images: dict[int, ImageEntry]
    annotations: dict[int, list[Annotation]]

    @classmethod
    def load(cls, ann_file: Path, image_root: Path, category: str = "person") -> CocoIndex:
        root = Path(os.path.normpath(image_root.absolute()))
        try:
            with ann_file.open("rb") as handle:
                data = json.load(handle)
            images = {
                int(image["id"]): ImageEntry(
                    _image_path(root, image["file_name"], ann_file), int(image["height"]), int(image["width"])
                )
                for image in data["images"]
            }
            category_ids = {int(c["id"]) for c in data["categories"] if c["name"] == category}
            by_image: dict[int, list[Annotation]] = defaultdict(list)
            for annotation in data["annotations"]:
                if int(annotation["category_id"]) in category_ids:
                    by_image[int(annotation["image_id"])].append(annotation)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{ann_file}: not a readable COCO annotation file ({e!r}); expected JSON with "
                "images (id, file_name, height, width), annotations and categories"
            ) from e
        if not category_ids:
            names = sorted({str(c.get("name")) for c in data["categories"]})
            raise DataError(f"{ann_file}: no category named {category!r}; categories are {names[:20]}")
        unknown = sorted(set(by_image) - set(images))
        if unknown:
            raise DataError(
                f"{ann_file}: annotations refer to image_id {unknown[0]}, which is not in its images "
                "list; expected every annotated image to be listed"
            )
        return cls(ann_file, root, images, dict(by_image))


def _image_path(root: Path, file_name: str, ann_file: Path) -> Path:
    """`root / file_name`, refusing names that would read outside the image root (absolute or `..`)."""
    path = Path(os.path.normpath(root / file_name))
    if PurePath(file_name).is_absolute() or not path.is_relative_to(root):
        raise DataError(
            f"{ann_file}: file_name {file_name!r} escapes the image root {root}; "
            "expected a path relative to it"
        )
    return path


def _decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask from polygons, uncompressed RLE (list counts) or compressed RLE (string counts)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    else:
        rle = segmentation
    if tuple(rle["size"]) != (height, width):
        raise ValueError(f"mask size {tuple(rle['size'])} does not match the image size {(height, width)}")
    return mask_utils.decode(rle)


class CocoPersonDataset(PersonDataset):
    """The images `image_ids` of a CocoIndex, with their person instances."""

    def __init__(
        self,
        index: CocoIndex,
        image_ids: Iterable[int],
        options: LoaderOptions,
        *,
        train: bool,
        name: str = "coco",
    ) -> None:
        super().__init__(name, options, train=train)
        self.index = index
        self.image_root = index.image_root
        self.annotation_files = [index.ann_file]
        self.image_ids: list[int] = []
        self._annotations: list[list[Annotation]] = []
        self.image_paths = []
        for image_id in image_ids:
            annotations = [
                a for a in index.annotations.get(image_id, []) if not (train and a.get("iscrowd", 0))
            ]
            if not annotations and not options.keep_empty:
                continue
            path = index.images[image_id].path
            if not path.is_file():
                raise DataError(
                    f"{index.ann_file}: image_id {image_id} names {path}, which does not exist; "
                    "expected every annotated image under the image root"
                )
            self.image_ids.append(image_id)
            self._annotations.append(annotations)
            self.image_paths.append(path)

    def _load_raw(self, index: int) -> Sample:
        image_id, path = self.image_ids[index], self.image_paths[index]
        height, width = self.index.images[image_id].height, self.index.images[image_id].width
        image = read_rgb(path)
        if tuple(image.shape[-2:]) != (height, width):
            raise DataError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} but {self.index.ann_file} "
                f"annotates it as {width}x{height}; expected the sizes to match"
            )
        annotations = self._annotations[index]
        masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
        boxes = torch.zeros((len(annotations), 4), dtype=torch.float32)
        for i, annotation in enumerate(annotations):
            try:
                masks[i] = _decode_mask(annotation["segmentation"], height, width)
                x, y, w, h = (float(v) for v in annotation["bbox"])
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise DataError(
                    f"{self.index.ann_file}: annotation id {annotation.get('id')} for {path} is "
                    f"invalid ({e}); expected a polygon or RLE segmentation of the image's size "
                    "and an [x, y, w, h] bbox"
                ) from e
            boxes[i] = torch.tensor([x, y, x + w, y + h])
        iscrowd = torch.tensor([int(a.get("iscrowd", 0)) for a in annotations], dtype=torch.int64)
        return image, make_target(boxes, torch.from_numpy(masks), iscrowd, image_id)


def build_coco(data_cfg: DictConfig) -> tuple[CocoPersonDataset, CocoPersonDataset]:
    """(train, val) from `data.train` and `data.val`, or (`data.val: null`) a seeded split of `data.train`."""
    options = LoaderOptions.from_cfg(data_cfg)
    train_index = _load_index(data_cfg.train, "data.train", data_cfg.category)
    if data_cfg.val is not None:
        val_index = _load_index(data_cfg.val, "data.val", data_cfg.category)
        train_ids, val_ids = sorted(train_index.images), sorted(val_index.images)
    else:
        if not 0 < data_cfg.val_fraction < 1:
            raise ConfigError(
                "data.val_fraction", data_cfg.val_fraction, "a number in (0, 1) when data.val is null"
            )
        val_index = train_index
        train_ids, val_ids = seeded_split(
            sorted(train_index.images), data_cfg.val_fraction, data_cfg.split_seed
        )
    return (
        CocoPersonDataset(train_index, train_ids, options, train=True, name=data_cfg.name),
        CocoPersonDataset(val_index, val_ids, options, train=False, name=data_cfg.name),
    )


def _load_index(split_cfg: DictConfig, key: str, category: str) -> CocoIndex:
    ann_file = existing_path(
        split_cfg.ann_file, f"{key}.ann_file", "a COCO annotation JSON file", is_dir=False
    )
    image_root = existing_path(
        split_cfg.image_root, f"{key}.image_root", "a directory of images", is_dir=True
    )
    return CocoIndex.load(ann_file, image_root, category)
