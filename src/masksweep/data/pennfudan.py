"""PennFudan-style layout: `root/PNGImages/<stem>.png` with `root/PedMasks/<stem>_mask.png`, whose pixel
values are instance ids (0 = background). Split into train and val by a seeded fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.ops import masks_to_boxes

from masksweep.data.base import LoaderOptions, PersonDataset, Sample, existing_path, seeded_split
from masksweep.data.images import read_label_map, read_rgb
from masksweep.data.transforms import make_target
from masksweep.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
        name: str = "pennfudan",
    ) -> None:
        super().__init__(name, options, train=train)
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
            # Emptiness is only known from the mask, so keep_empty=false reads the (small) masks up front.
            if not options.keep_empty and not (read_label_map(mask_path) != 0).any():
                continue
            self.image_ids.append(image_id)
            self.image_paths.append(image_path)
            self.mask_paths.append(mask_path)
        self.annotation_files = self.mask_paths

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


def build_pennfudan(data_cfg: DictConfig) -> tuple[PennFudanDataset, PennFudanDataset]:
    expected = "a directory holding PNGImages/ and PedMasks/"
    root = existing_path(data_cfg.root, "data.root", expected, is_dir=True)
    for sub in ("PNGImages", "PedMasks"):
        if not (root / sub).is_dir():
            raise DataError(
                f"data.root={data_cfg.root!r}: {root} has no {sub}/ directory; expected {expected}"
            )
    paths = sorted(p for p in (root / "PNGImages").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root / 'PNGImages'} holds no images; expected files ending in {IMAGE_SUFFIXES}")
    if not 0 < data_cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", data_cfg.val_fraction, "a number in (0, 1)")
    # Ids are positions in the sorted listing, so an image keeps its id whatever the split.
    train, val = seeded_split(list(enumerate(paths, start=1)), data_cfg.val_fraction, data_cfg.split_seed)
    options = LoaderOptions.from_cfg(data_cfg)
    return (
        PennFudanDataset(root, train, options, train=True, name=data_cfg.name),
        PennFudanDataset(root, val, options, train=False, name=data_cfg.name),
    )
