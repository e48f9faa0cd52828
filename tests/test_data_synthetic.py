"""Synthetic person generator: determinism, the on-disk cache, and annotations that match what is drawn."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from masksweep.data.synthetic import ensure_synthetic, generate, render_scene

SIZE = 64


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    generate(tmp_path / "a", "train", 4, SIZE, seed=3)
    generate(tmp_path / "b", "train", 4, SIZE, seed=3)
    generate(tmp_path / "c", "train", 4, SIZE, seed=4)
    generate(tmp_path / "d", "val", 4, SIZE, seed=3)
    reference = _files(tmp_path / "a")
    assert reference == _files(tmp_path / "b")
    for other in ("c", "d"):  # another seed, or the other split of the same seed
        images = {k: v for k, v in _files(tmp_path / other).items() if k.startswith("images/")}
        assert not set(images.items()) & set(reference.items())


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path: Path) -> None:
    params = {"cache_dir": tmp_path, "split": "train", "num_images": 2, "image_size": SIZE, "seed": 0}
    first = ensure_synthetic(**params)
    stamp = first.ann_file.stat().st_mtime_ns
    again = ensure_synthetic(**params)
    assert again == first and again.ann_file.stat().st_mtime_ns == stamp  # not regenerated
    changed = [
        ensure_synthetic(**{**params, key: value})
        for key, value in (("split", "val"), ("num_images", 3), ("image_size", 48), ("seed", 1))
    ]
    roots = {first.image_root, *(paths.image_root for paths in changed)}
    assert len(roots) == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch left


def _ensure_in_child(cache_dir: str) -> str:
    return str(ensure_synthetic(cache_dir, "train", 6, SIZE, seed=5).ann_file)


def test_processes_racing_for_the_same_cache_entry_agree(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_ensure_in_child, [str(tmp_path)] * 2)
    assert results[0] == results[1]
    coco = json.loads(Path(results[0]).read_text())
    assert len(coco["images"]) == 6
    assert all((Path(results[0]).parent / "images" / i["file_name"]).is_file() for i in coco["images"])
    assert [p.name for p in tmp_path.iterdir()] == [Path(results[0]).parent.name]


def test_annotations_are_nonempty_and_boxes_fit_masks(tmp_path: Path) -> None:
    paths = generate(tmp_path / "ds", "train", 12, SIZE, seed=0)
    coco = json.loads(paths.ann_file.read_text())
    assert coco["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=13)[1:]
    assert counts.max() <= 4 and (counts >= 1).mean() > 0.8
    for annotation in coco["annotations"]:
        mask = mask_utils.decode(annotation["segmentation"])
        rows, cols = np.nonzero(mask)
        assert mask.shape == (SIZE, SIZE) and annotation["iscrowd"] == 0
        assert annotation["area"] == mask.sum() > 0
        assert annotation["bbox"] == [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]


def test_people_are_large_and_distractors_are_not_annotated() -> None:
    for index in range(20):
        scene = render_scene(np.random.default_rng([0, 0, index]), SIZE)
        assert scene.distractor_mask.any()
        for mask in scene.person_masks:
            assert not (mask & scene.distractor_mask).any()
            rows = np.nonzero(mask.any(axis=1))[0]
            assert np.ptp(rows) + 1 >= 0.1 * SIZE  # even a partly hidden person keeps some height


def test_occluded_people_keep_only_their_visible_part() -> None:
    overlapping = 0
    for index in range(30):
        masks = render_scene(np.random.default_rng([1, 0, index]), SIZE).person_masks
        stacked = np.sum(masks, axis=0)
        assert stacked.max(initial=0) <= 1  # every pixel belongs to at most one person: visible parts only
        overlapping += any(_touching(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :])
    assert overlapping >= 3  # people do stand in front of each other


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two disjoint masks share an edge: how an occluding figure meets the occluded one."""
    grown = a | np.roll(a, 1, 0) | np.roll(a, -1, 0) | np.roll(a, 1, 1) | np.roll(a, -1, 1)
    return bool((grown & b).any())


@pytest.mark.parametrize("split", ["validation", ""])
def test_unknown_split_is_refused(tmp_path: Path, split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        ensure_synthetic(tmp_path, split, 1, SIZE, 0)
