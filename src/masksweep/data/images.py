"""Reading image files: the one place that decodes, honours EXIF orientation and reports bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from masksweep.errors import DataError

# Decoding errors PIL raises for unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_upright(path: Path) -> Image.Image:
    """Decode `path` fully, rotated as a viewer shows it (annotations are drawn on the upright image)."""
    try:
        with Image.open(path) as raw:
            raw.load()  # truncated files only fail here, and we want the failure now, naming the file
            return ImageOps.exif_transpose(raw)
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist; expected a readable image file") from e
    except UnidentifiedImageError as e:
        raise DataError(
            f"image file {path} cannot be decoded (unknown format); expected a PNG/JPEG/... image"
        ) from e
    except _DECODE_ERRORS as e:
        raise DataError(f"image file {path} cannot be decoded ({e}); expected a complete, valid image") from e


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
