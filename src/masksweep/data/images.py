"""Reading image files: the one place that decodes, honours EXIF orientation and reports bad files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from masksweep.errors import DataError

# Decoding errors PIL raises for unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_upright(path: Path) -> Image.Image:
    """Decode `path` fully, rotated as a viewer shows it (annotations are drawn on the upright image)."""
    with _naming(path, "decoded"), Image.open(path) as raw:
        raw.load()  # truncated files only fail here, and we want the failure now, naming the file
        return ImageOps.exif_transpose(raw)


@contextmanager
def _naming(path: Path, verb: str) -> Iterator[None]:
    """PIL's errors while `path` is read, as the one-line DataError that names the file."""
    try:
        yield
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist; expected a readable image file") from e
    except UnidentifiedImageError as e:
        raise DataError(
            f"image file {path} cannot be decoded (unknown format); expected a PNG/JPEG/... image"
        ) from e
    except _DECODE_ERRORS as e:
        raise DataError(f"image file {path} cannot be {verb} ({e}); expected a complete, valid image") from e


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) as `read_rgb` will decode it (EXIF rotation included), from the file's header only:
    PIL's open() parses the header and defers decoding, so checking every image of a split stays cheap."""
    with _naming(path, "read"), Image.open(path) as image:
        width, height = image.size
        # Only an orientation the header already holds: PngImageFile.getexif() decodes the whole image
        # when its EXIF chunk comes after the pixels, and such files are rare.
        if "exif" in image.info and image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
            width, height = height, width  # exif_transpose turns these a quarter
    return width, height


def check_decodes(path: Path) -> None:
    """Decode `path` in full and discard it: DataError names the file if its data is truncated or corrupt."""
    _open_upright(path)


def read_rgb(path: Path) -> tv_tensors.Image:
    """uint8 (3, H, W) RGB: grayscale, RGBA, palette and CMYK files are converted, alpha is dropped."""
    image = _open_upright(path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's documented route for palettes with a transparent index
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    return tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())


def read_label_map(path: Path) -> np.ndarray:
    """Integer (H, W) map of a single-channel mask file; palette indices are kept, not recoloured."""
    image = _open_upright(path)
    if image.mode not in ("1", "L", "P", "I", "I;16"):
        raise DataError(f"mask file {path} has mode {image.mode}; expected a single-channel (L, P, I) image")
    return np.asarray(image).astype(np.int64)
