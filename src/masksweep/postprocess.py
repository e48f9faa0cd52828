"""Post-processing of Mask R-CNN predictions: an instance-id map and the report's overlay image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_GOLDEN = 0.618033988749895  # hue step: consecutive ids land far apart on the colour wheel


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def instance_map(
    prediction: dict[str, Any], score_threshold: float = 0.5, mask_threshold: float = 0.5
) -> np.ndarray:
    """(H, W) map of instance ids: 0 = background, 1..N = kept instances in descending score order.

    ``prediction`` is torchvision's Mask R-CNN output (``masks`` (K, 1, H, W) probabilities, ``scores`` (K,);
    scores need not be sorted). Instances with ``score >= score_threshold`` are kept and binarised at
    ``mask > mask_threshold``. Where instances overlap, the higher-scoring one (lower id) wins, so an instance
    fully covered by better ones, or with an empty mask, keeps its id but does not appear in the map. Ties in
    score keep the input order. dtype is uint8 for N <= 255, uint16 up to 65535, uint32 beyond.
    """
    masks = _to_numpy(prediction["masks"])
    scores = _to_numpy(prediction["scores"]).reshape(-1)
    height, width = masks.shape[-2:]
    masks = masks.reshape(-1, height, width)

    keep = np.flatnonzero(scores >= score_threshold)
    order = keep[np.argsort(-scores[keep], kind="stable")]
    n = len(order)
    dtype = np.uint8 if n <= 0xFF else np.uint16 if n <= 0xFFFF else np.uint32
    if n == 0:
        return np.zeros((height, width), dtype=dtype)
    binary = masks[order] > mask_threshold  # (N, H, W), best first
    # argmax over a boolean stack returns the first True, i.e. the best-scoring instance covering the pixel.
    ids = binary.argmax(axis=0).astype(dtype) + 1
    ids[~binary.any(axis=0)] = 0
    return ids


def palette(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 colours: row 0 black (background), row i a fixed colour for instance id i.

    Hues follow the golden-ratio sequence, so colours are deterministic and neighbouring ids are distinct.
    """
    ids = np.arange(1, n + 1, dtype=np.float64)
    hue = (ids * _GOLDEN) % 1.0
    sat = 0.55 + 0.35 * ((ids * 0.37) % 1.0)  # vary saturation/value a little so far ids differ as well
    val = 0.80 + 0.20 * ((ids * 0.71) % 1.0)
    # Vectorised HSV -> RGB.
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    table = np.stack(
        [
            np.stack([val, t, p], 1),
            np.stack([q, val, p], 1),
            np.stack([p, val, t], 1),
            np.stack([p, q, val], 1),
            np.stack([t, p, val], 1),
            np.stack([val, p, q], 1),
        ]
    )  # (6, n, 3)
    rgb = table[sector, np.arange(n)] if n else np.zeros((0, 3))
    return np.concatenate([np.zeros((1, 3), np.uint8), np.round(rgb * 255).astype(np.uint8)])


def colorize(instance_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 palette image of an instance map (background black), for saving a viewable map."""
    ids = np.asarray(instance_map)
    return palette(int(ids.max(initial=0)))[ids]


def _image_hwc_255(image: Any) -> np.ndarray:
    """Image as float64 (H, W, 3) in [0, 255]. Tensors are CHW (torchvision), arrays HWC (PIL/numpy).

    uint8 input is taken as [0, 255], anything else as [0, 1].
    """
    array = _to_numpy(image)
    if isinstance(image, torch.Tensor):
        array = array[..., None] if array.ndim == 2 else np.moveaxis(array, 0, -1)
    elif array.ndim == 2:
        array = array[..., None]
    scale = 1.0 if array.dtype == np.uint8 else 255.0
    array = array.astype(np.float64) * scale
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]


def overlay(
    image: Any, instance_map: np.ndarray, alpha: float = 0.5, background_dim: float = 0.4
) -> np.ndarray:
    """(H, W, 3) uint8 visualisation: instances tinted with their palette colour, background darkened.

    ``image``: float [0, 1] CHW tensor or uint8 HWC array (float arrays/tensors are taken as [0, 1], uint8 as
    [0, 255]). Instance pixels become ``(1 - alpha) * image + alpha * colour``; background pixels become
    ``image * background_dim``, which makes the segmented people stand out as in the report's figures.
    """
    pixels = _image_hwc_255(image)
    ids = np.asarray(instance_map)
    if pixels.shape[:2] != ids.shape:
        raise ValueError(f"overlay: image {pixels.shape[:2]} and instance map {ids.shape} differ in size")
    colours = palette(int(ids.max(initial=0))).astype(np.float64)[ids]
    foreground = (ids > 0)[..., None]
    out = np.where(foreground, (1.0 - alpha) * pixels + alpha * colours, pixels * background_dim)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
