"""COCO-format person instances: the loader the synthetic data goes through as well.

Annotations are filtered to one category chosen by name (ids are not assumed contiguous). Crowd regions are
left out of training targets and kept, with iscrowd=1, for evaluation. The evaluation ground truth is the
annotation file's own person annotations for the split's images, verbatim (areas, crowd flags, polygons and
RLE at original size, category id), so AP matches what pycocotools computes from the same file.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from masksweep.data.base import (
    LoaderOptions,
    PersonDataset,
    Sample,
    check_fractions,
    existing_path,
    seeded_split,
)
from masksweep.data.images import header_size, read_rgb
from masksweep.data.transforms import make_target
from masksweep.errors import ConfigError, DataError

Annotation = dict[str, Any]


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    height: int
    width: int
    record: dict[str, Any]  # the file's own image entry, for the evaluation ground truth


@dataclass(frozen=True)
class CocoIndex:
    """One parsed annotation file: its images and, per image id, the annotations of the chosen category."""

    ann_file: Path
    image_root: Path
    images: dict[int, ImageEntry]
    annotations: dict[int, list[Annotation]]
    category: dict[str, Any]  # the file's entry for the chosen category

    @classmethod
    def load(cls, ann_file: Path, image_root: Path, category: str = "person") -> CocoIndex:
        root = Path(os.path.normpath(image_root.absolute()))
        try:
            with ann_file.open("rb") as handle:
                data = json.load(handle)
            images = {
                int(image["id"]): ImageEntry(
                    _image_path(root, image["file_name"], ann_file),
                    int(image["height"]),
                    int(image["width"]),
                    image,
                )
                for image in data["images"]
            }
            matches = [c for c in data["categories"] if c["name"] == category]
            category_ids = {int(c["id"]) for c in matches}
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
        if len(category_ids) > 1:  # predictions need one category id to be scored and exported under
            raise DataError(
                f"{ann_file}: categories {sorted(category_ids)} are all named {category!r}; expected one"
            )
        unknown = sorted(set(by_image) - set(images))
        if unknown:
            raise DataError(
                f"{ann_file}: annotations refer to image_id {unknown[0]}, which is not in its images "
                "list; expected every annotated image to be listed"
            )
        return cls(ann_file, root, images, dict(by_image), dict(matches[0]))


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
    ) -> None:
        super().__init__(options, train=train)
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
                crowd_only = bool(index.annotations.get(image_id))
                self._drop("only crowd regions" if crowd_only else "no person")
                continue
            entry = index.images[image_id]
            path = entry.path
            if not path.is_file():
                raise DataError(
                    f"{index.ann_file}: image_id {image_id} names {path}, which does not exist; "
                    "expected every annotated image under the image root"
                )
            # The header only (no decode), for every image: a wrong size fails the run here, not at epoch 3.
            width, height = header_size(path)
            if (width, height) != (entry.width, entry.height):
                raise DataError(
                    f"{path}: image is {width}x{height} but {index.ann_file} annotates it as "
                    f"{entry.width}x{entry.height}; expected the sizes to match"
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

    def coco_ground_truth(self) -> dict[str, Any]:
        images = [dict(self.index.images[i].record) for i in self.image_ids]
        annotations = [dict(a) for i in self.image_ids for a in self.index.annotations.get(i, [])]
        return {"images": images, "annotations": annotations, "categories": [dict(self.index.category)]}


def coco(
    split: str,
    *,
    train: dict[str, str],
    val: dict[str, str] | None = None,
    test: dict[str, str] | None = None,
    category: str = "person",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    hflip: float = 0.5,
    keep_empty: bool = False,
    cache_images: bool = False,
) -> CocoPersonDataset:
    """The `split` of a COCO-format dataset: train and val from their own files, or (`val: null`) val carved
    out of the train file by a seeded split; test (optional) always from its own file."""
    options = LoaderOptions.checked(hflip, keep_empty, cache_images)
    if split == "test":
        if test is None:
            raise ConfigError("data.test", None, "an {ann_file, image_root} mapping to build a test split")
        index = _load_index(test, "data.test", category)
        return CocoPersonDataset(index, sorted(index.images), options, train=False)
    if val is not None:
        split_cfg, key = (train, "data.train") if split == "train" else (val, "data.val")
        index = _load_index(split_cfg, key, category)
        return CocoPersonDataset(index, sorted(index.images), options, train=split == "train")
    check_fractions(val_fraction, None)
    index = _load_index(train, "data.train", category)
    train_ids, val_ids, _ = seeded_split(sorted(index.images), val_fraction, split_seed)
    return CocoPersonDataset(
        index, train_ids if split == "train" else val_ids, options, train=split == "train"
    )


def _load_index(split_cfg: dict[str, str], key: str, category: str) -> CocoIndex:
    if not isinstance(split_cfg, dict) or not {"ann_file", "image_root"} <= set(split_cfg):
        raise ConfigError(key, split_cfg, "a mapping with ann_file and image_root")
    ann_file = existing_path(
        split_cfg["ann_file"], f"{key}.ann_file", "a COCO annotation JSON file", is_dir=False
    )
    image_root = existing_path(
        split_cfg["image_root"], f"{key}.image_root", "a directory of images", is_dir=True
    )
    stat = ann_file.stat()
    return _cached_index(ann_file, image_root, category, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _cached_index(ann_file: Path, image_root: Path, category: str, mtime_ns: int, size: int) -> CocoIndex:
    """Each split is built by its own call; when val is carved out of the train file, both share one parse
    (COCO's train file is ~450 MB of JSON). Keyed by mtime and size too, so an edited file is re-read."""
    return CocoIndex.load(ann_file, image_root, category)
