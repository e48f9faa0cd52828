"""Synthetic person dataset: procedurally drawn people on textured backgrounds, written as PNG + COCO JSON.

Small Mask R-CNNs learn it in a few epochs on a CPU, so sweeps and tests run without downloading anything.
Each image comes from its own RNG stream seeded by (seed, split, index): generation is deterministic, the
train, val and test splits never share an image, and image i is the same whatever the number of images.

A scene is a stack of layers drawn back to front: distractors (circles, rectangles, bars, blobs: never
annotated), then people (smaller, i.e. farther, first), then a few distractors in front. A person's mask is
the part no later layer covers; people left almost fully hidden are not drawn at all, so no unannotated
fragment of a person remains in the image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from masksweep import cache
from masksweep.data.base import LoaderOptions
from masksweep.data.coco import CocoIndex, CocoPersonDataset
from masksweep.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the drawing changes, so caches made by older code are not reused.
GENERATOR_VERSION = 2  # 2: bigger, pedestrian-like people (thicker limbs, closer to the body)
SPLITS = ("train", "val", "test")

# Person height as a fraction of the image side, and people per image.
HEIGHT_RANGE = (0.4, 0.85)
PEOPLE_RANGE = (1, 4)
# A person whose visible part is below this fraction of its drawn area counts as hidden and is left out.
MIN_VISIBLE_FRACTION = 0.5

# Part labels on a person's canvas; each part gets its own colour. 0 is "not this layer".
_SKIN, _TOP, _BOTTOM, _HAIR = 1, 2, 3, 4


@dataclass(frozen=True)
class SyntheticSplit:
    image_root: Path
    ann_file: Path


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    person_masks: list[np.ndarray]  # visible part of each person, (S, S) bool, back to front
    distractor_mask: np.ndarray  # (S, S) bool: the pixels where a distractor is visible


@dataclass(frozen=True)
class _Layer:
    labels: np.ndarray  # (S, S) uint8 part labels, 0 outside the layer
    palette: np.ndarray  # (5, 3) colour per part label
    is_person: bool


def _direction(angle_deg: float) -> np.ndarray:
    """Unit (x, y) vector in image coordinates: 0 degrees points down, positive angles turn towards +x."""
    angle = np.deg2rad(angle_deg)
    return np.array([np.sin(angle), np.cos(angle)])


def _limb(draw: ImageDraw.ImageDraw, points: list[np.ndarray], width: int, label: int) -> None:
    """A thick jointed segment chain with rounded joints and ends."""
    draw.line([tuple(p) for p in points], fill=label, width=width, joint="curve")
    radius = width / 2
    for x, y in points:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=label)


def _person_labels(rng: np.random.Generator, size: int, hip: np.ndarray, height: float) -> np.ndarray:
    """Part-label canvas of one person of `height` pixels whose hip centre is at `hip`."""
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    build = rng.uniform(0.8, 1.25)  # stocky or slim: scales every width, not the lengths
    lean = rng.normal(0.0, 8.0)
    down, right = _direction(lean), _direction(lean + 90.0)
    neck = hip - 0.30 * height * down
    head_radius = 0.07 * height
    head = neck - (0.03 * height + head_radius) * down

    # Legs first, so the torso covers their tops. A walking stance: the knees bend the way the person faces.
    facing = rng.choice([-1.0, 1.0])
    leg_width = max(2, round(0.10 * height * build))
    for side in (-1.0, 1.0):
        thigh_angle = lean + rng.uniform(-20.0, 20.0)
        shin_angle = thigh_angle - facing * rng.uniform(0.0, 35.0)
        start = hip + side * 0.05 * height * build * right
        knee = start + 0.24 * height * _direction(thigh_angle)
        foot = knee + 0.23 * height * _direction(shin_angle)
        _limb(draw, [start, knee, foot], leg_width, _BOTTOM)

    shoulder_half, hip_half = 0.11 * height * build, 0.075 * height * build
    torso = [
        neck - shoulder_half * right,
        neck + shoulder_half * right,
        hip + hip_half * right,
        hip - hip_half * right,
    ]
    draw.polygon([tuple(p) for p in torso], fill=_TOP)

    arm_width = max(2, round(0.07 * height * build))
    for side in (-1.0, 1.0):
        raised = rng.random() < 0.1
        upper_angle = lean + side * (rng.uniform(100.0, 170.0) if raised else rng.uniform(5.0, 40.0))
        fore_angle = upper_angle + side * rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 60.0)
        shoulder = neck + side * (shoulder_half - arm_width / 2) * right
        elbow = shoulder + 0.16 * height * _direction(upper_angle)
        hand = elbow + 0.15 * height * _direction(fore_angle)
        _limb(draw, [shoulder, elbow, hand], arm_width, _TOP)
        hand_radius = 0.65 * arm_width
        draw.ellipse((*(hand - hand_radius), *(hand + hand_radius)), fill=_SKIN)

    half_axes = np.array([0.85, 1.0]) * head_radius
    head_box = (*(head - half_axes), *(head + half_axes))
    draw.ellipse(head_box, fill=_SKIN)
    if rng.random() < 0.7:
        draw.chord(head_box, 180, 360, fill=_HAIR)  # the upper half of the head
    return np.asarray(canvas)


def _person_palette(rng: np.random.Generator) -> np.ndarray:
    light, dark = np.array([255.0, 224.0, 189.0]), np.array([80.0, 50.0, 35.0])
    skin = light + rng.uniform() * (dark - light)
    hair = rng.uniform(10.0, 120.0) * np.array([1.0, 0.8, 0.6])
    return np.stack([np.zeros(3), skin, rng.uniform(0, 255, 3), rng.uniform(0, 200, 3), hair])


def _distractor_labels(rng: np.random.Generator, size: int) -> np.ndarray:
    """Canvas with one non-person shape (label 1): circle, rectangle, thin bar or blob."""
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    centre = rng.uniform(0, size, 2)
    radius = rng.uniform(0.05, 0.25) * size
    kind = rng.integers(4)
    if kind == 0:
        squash = rng.uniform(0.6, 1.0)
        half_axes = np.array([1.0, squash]) * radius
        draw.ellipse((*(centre - half_axes), *(centre + half_axes)), fill=1)
    elif kind in (1, 2):  # rectangle, or a bar that looks like a limb and must still not count as a person
        half = (
            [radius, radius * rng.uniform(0.4, 1.0)]
            if kind == 1
            else [rng.uniform(0.15, 0.4) * size, 0.02 * size]
        )
        angle = rng.uniform(0, np.pi)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        draw.polygon([tuple(p) for p in corners @ rotation.T + centre], fill=1)
    else:  # a blob: a radius wobbling with a few harmonics
        theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        wobble = sum(rng.uniform(0, 0.25) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        points = centre + (radius * (1 + wobble))[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        draw.polygon([tuple(p) for p in points], fill=1)
    return np.asarray(canvas)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float: a gradient, maybe stripes, maybe low-frequency blotches."""
    ys, xs = np.mgrid[0:size, 0:size] / size

    def ramp() -> np.ndarray:  # a linear ramp in [0, 1] along a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        return (t - t.min()) / (t.max() - t.min())

    start, end = rng.uniform(0, 255, (2, 3))
    image = start + ramp()[..., None] * (end - start)
    if rng.random() < 0.5:
        stripes = np.sin(2 * np.pi * rng.uniform(2, 10) * ramp() + rng.uniform(0, 2 * np.pi)) > 0
        alpha = rng.uniform(0.2, 0.6)
        image = np.where(stripes[..., None], (1 - alpha) * image + alpha * rng.uniform(0, 255, 3), image)
    if rng.random() < 0.6:
        cells = rng.integers(3, 9)
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        blotches = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        image += rng.uniform(0.1, 0.4) * (blotches - 128)
    return image


def _place_people(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, float]]:
    """(hip centre, height) per person, farthest (smallest) first; best-of-3 sampling spreads them out."""
    heights = np.sort(rng.uniform(*HEIGHT_RANGE, rng.integers(PEOPLE_RANGE[0], PEOPLE_RANGE[1] + 1)) * size)
    people: list[tuple[np.ndarray, float]] = []
    for height in heights:
        candidates = rng.uniform(0.1 * size, 0.9 * size, 3)
        spread = [min((abs(x - hip[0]) for hip, _ in people), default=0.0) for x in candidates]
        top = rng.uniform(-0.05 * height, size - 0.9 * height)  # head top; keeps the feet near the image
        people.append((np.array([candidates[int(np.argmax(spread))], top + 0.47 * height]), float(height)))
    return people


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """One image of `size` x `size` pixels and the visible mask of each person in it."""
    layers = [
        _Layer(_distractor_labels(rng, size), rng.uniform(0, 255, (2, 3)), False)
        for _ in range(rng.integers(2, 6))
    ]
    layers += [
        _Layer(_person_labels(rng, size, hip, height), _person_palette(rng), True)
        for hip, height in _place_people(rng, size)
    ]
    layers += [
        _Layer(_distractor_labels(rng, size), rng.uniform(0, 255, (2, 3)), False)
        for _ in range(rng.binomial(2, 0.25))
    ]

    # Front to back: a layer shows what the kept layers in front of it leave uncovered. A person left almost
    # fully hidden is dropped before anything is painted.
    covered = np.zeros((size, size), dtype=bool)
    kept: list[tuple[_Layer, np.ndarray]] = []
    for layer in reversed(layers):
        drawn = layer.labels > 0
        visible = drawn & ~covered
        if layer.is_person and visible.sum() < max(MIN_VISIBLE_FRACTION * drawn.sum(), 1):
            continue
        kept.append((layer, visible))
        covered |= drawn
    kept.reverse()

    image = _background(rng, size)
    for layer, visible in kept:  # painting only the visible pixels is the painter's algorithm, done once
        image[visible] = layer.palette[layer.labels[visible]]
    image += rng.normal(0.0, rng.uniform(2.0, 8.0), image.shape)  # sensor-like noise textures the flat paint
    return Scene(
        image=np.clip(image, 0, 255).astype(np.uint8),
        person_masks=[visible for layer, visible in kept if layer.is_person],
        distractor_mask=np.any([visible for layer, visible in kept if not layer.is_person], axis=0),
    )


def _coco_annotations(masks: list[np.ndarray], image_id: int, first_id: int) -> list[dict]:
    annotations = []
    for offset, mask in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": 0,
            }
        )
    return annotations


def generate(out_dir: Path, split: str, num_images: int, image_size: int, seed: int) -> SyntheticSplit:
    """Write `num_images` scenes to `out_dir/images/*.png` and `out_dir/annotations.json`."""
    image_root = out_dir / "images"
    image_root.mkdir(parents=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        scene = render_scene(rng, image_size)
        image_id, file_name = index + 1, f"{index:06d}.png"
        Image.fromarray(scene.image).save(image_root / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        annotations += _coco_annotations(scene.person_masks, image_id, first_id=len(annotations) + 1)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    ann_file = out_dir / "annotations.json"
    ann_file.write_text(json.dumps(coco))
    return SyntheticSplit(image_root, ann_file)


def ensure_synthetic(
    cache_dir: str | Path, split: str, num_images: int, image_size: int, seed: int
) -> SyntheticSplit:
    """The cached dataset for these parameters, generated on first use.

    The cache key hashes every parameter and GENERATOR_VERSION. Generation writes into a private temporary
    directory that is renamed into place: a rename is atomic, so a reader never sees a half-written dataset,
    and when two processes race the loser drops its copy and uses the winner's.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    params = {
        "generator": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir).expanduser().absolute()
    final = cache_dir / f"{split}-{digest}"
    cached = SyntheticSplit(final / "images", final / "annotations.json")
    if final.is_dir():
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Generating the synthetic %s split (%d images, %d px): %s", split, num_images, image_size, final)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        generate(scratch, split, num_images, image_size, seed)
        (scratch / "params.json").write_text(json.dumps(params, indent=1))
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        os.rename(scratch, final)
    except OSError:
        if not final.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cached


def synthetic(
    split: str,
    *,
    image_size: int,
    num_train: int,
    num_val: int,
    test: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    hflip: float = 0.5,
    keep_empty: bool = False,
    cache_images: bool = True,
) -> CocoPersonDataset:
    """Generate (or reuse) the `split`, then load it through the COCO loader like any COCO dataset.

    `image_size` is the generated images' side; `test` is the number of test images, or null for none."""
    options = LoaderOptions.checked(hflip, keep_empty, cache_images)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError("data.image_size", image_size, "an integer >= 1 (the generated images' side)")
    key, count = {"train": ("data.num_train", num_train), "val": ("data.num_val", num_val)}.get(
        split, ("data.test", test)
    )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(
            key, count, "an integer >= 1" + (" (the number of test images)" if split == "test" else "")
        )
    paths = ensure_synthetic(cache.resolve(cache_dir, "synthetic"), split, count, image_size, int(seed))
    index = CocoIndex.load(paths.ann_file, paths.image_root)
    return CocoPersonDataset(index, sorted(index.images), options, train=split == "train")
