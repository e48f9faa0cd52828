"""Small on-disk datasets for the data tests: COCO files, PennFudan layouts, configs pointing at them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def data_cfg(name: str, /, **overrides: Any) -> DictConfig:
    """The shipped `conf/data/<name>.yaml` with `overrides` merged in, as Hydra would compose it."""
    return OmegaConf.merge(OmegaConf.load(CONF_DATA / f"{name}.yaml"), overrides)


def train_val(cfg: DictConfig) -> tuple[Any, Any]:
    """(train, val) of `build_datasets(cfg)`."""
    from masksweep.data import build_datasets

    splits = build_datasets(cfg)
    return splits.train, splits.val


def rect_mask(size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 with ones in rows[0]:rows[1], cols[0]:cols[1]."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's list-of-counts RLE (as used for iscrowd regions): column-major runs, starting with zeros."""
    flat = mask.flatten(order="F")
    boundaries = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def rect_polygon(rows: tuple[int, int], cols: tuple[int, int]) -> list[list[float]]:
    """The polygon pycocotools rasterises to `rect_mask(..., rows, cols)`."""
    (y0, y1), (x0, x1) = rows, cols
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def xywh(mask: np.ndarray) -> list[float]:
    return mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()


def save_image(path: Path, image: Image.Image, **save_args: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


def solid_rgb(width: int, height: int, colour: tuple[int, int, int] = (200, 100, 50)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def exif_rotated_png(path: Path) -> Path:
    """A 16x8 (W x H) image, left half red, right half blue, whose EXIF says "rotate 90 degrees clockwise".

    Shown upright it is 8 wide and 16 tall, red on top.
    """
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise to be upright
    return save_image(path, Image.fromarray(pixels), exif=exif.tobytes())


def corrupt_png(path: Path) -> Path:
    """A file with a PNG header whose data is cut short."""
    buffer = io.BytesIO()
    solid_rgb(16, 16).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:40])
    return path


class CocoFile:
    """Builds a COCO annotation file. Category ids are deliberately non-contiguous and person is not id 1."""

    def __init__(self, categories: list[dict[str, Any]] | None = None) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = categories or [{"id": 1, "name": "dog"}, {"id": 23, "name": "person"}]

    def image(self, image_id: int, file_name: str, width: int, height: int) -> CocoFile:
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return self

    def annotation(
        self,
        image_id: int,
        segmentation: Any,
        bbox: list[float],
        *,
        category: str = "person",
        iscrowd: int = 0,
    ) -> CocoFile:
        category_id = next(c["id"] for c in self.categories if c["name"] == category)
        self.annotations.append(
            {
                "id": 100 + 7 * len(self.annotations),
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": segmentation,
                "bbox": bbox,
                "area": float(bbox[2] * bbox[3]),
                "iscrowd": iscrowd,
            }
        )
        return self

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        path.write_text(json.dumps(content))
        return path


def coco_cfg(ann_file: Path, image_root: Path, **overrides: Any) -> DictConfig:
    """conf/data/coco.yaml with train and val both reading `ann_file` (tests compare the two views)."""
    split = {"ann_file": str(ann_file), "image_root": str(image_root)}
    return data_cfg("coco", **{"train": split, "val": split, **overrides})


def pennfudan_layout(root: Path, label_maps: dict[str, np.ndarray]) -> Path:
    """root/PNGImages/<stem>.png (a grey image) and root/PedMasks/<stem>_mask.png (the label map, mode L)."""
    for stem, label_map in label_maps.items():
        height, width = label_map.shape
        save_image(root / "PNGImages" / f"{stem}.png", solid_rgb(width, height, (90, 90, 90)))
        save_image(root / "PedMasks" / f"{stem}_mask.png", Image.fromarray(label_map.astype(np.uint8)))
    return root
