"""PennFudan-style loader: PNGImages/ + PedMasks/ with one pixel value per instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_factories import data_cfg, pennfudan_layout, save_image, solid_rgb, train_val
from masksweep.data import build_datasets
from masksweep.errors import DataError

SIZE = 16


def _two_people() -> np.ndarray:
    label_map = np.zeros((SIZE, SIZE), dtype=np.uint8)
    label_map[2:10, 1:4] = 1
    label_map[5:15, 8:13] = 2
    return label_map


@pytest.fixture
def root(tmp_path: Path) -> Path:
    label_maps = {f"FudanPed{i:05d}": _two_people() for i in range(1, 10)}
    label_maps["PennPed00001"] = np.zeros((SIZE, SIZE), dtype=np.uint8)  # nobody in it
    return pennfudan_layout(tmp_path / "PennFudanPed", label_maps)


def test_each_pixel_value_is_one_instance(root: Path) -> None:
    _, val = train_val(data_cfg("pennfudan", root=str(root), hflip=0.0))
    image, target = val[0]
    assert image.shape == (3, SIZE, SIZE)
    expected = _two_people()
    assert torch.equal(
        target["masks"], torch.from_numpy(np.stack([expected == 1, expected == 2])).to(torch.uint8)
    )
    assert target["boxes"].tolist() == [[1, 2, 4, 10], [8, 5, 13, 15]]  # XYXY covering the pixels
    assert target["area"].tolist() == [24.0, 50.0]
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["labels"].tolist() == [1, 1]


def test_split_is_seeded_and_disjoint(root: Path) -> None:
    def split(seed: int) -> tuple[list[str], list[str]]:
        cfg = data_cfg("pennfudan", root=str(root), val_fraction=0.3, split_seed=seed, keep_empty=True)
        train, val = train_val(cfg)
        return [p.name for p in train.image_paths], [p.name for p in val.image_paths]

    train, val = split(0)
    assert len(train) == 7 and len(val) == 3
    assert not set(train) & set(val)
    assert split(0) == (train, val)
    assert split(3) != (train, val)


def test_keep_empty_decides_about_images_without_instances(root: Path) -> None:
    def names(keep_empty: bool) -> set[str]:
        train, val = train_val(data_cfg("pennfudan", root=str(root), keep_empty=keep_empty))
        return {p.name for p in train.image_paths + val.image_paths}

    assert "PennPed00001.png" in names(True)
    assert "PennPed00001.png" not in names(False)


def test_missing_mask_fails_at_build(root: Path) -> None:
    save_image(root / "PNGImages" / "Orphan.png", solid_rgb(SIZE, SIZE))
    with pytest.raises(DataError, match=r"Orphan\.png: its mask .*Orphan_mask\.png does not exist"):
        build_datasets(data_cfg("pennfudan", root=str(root), keep_empty=True))


def test_mask_whose_size_differs_from_its_image_fails_at_build(root: Path) -> None:
    bad = root / "PNGImages" / "FudanPed00009.png"
    save_image(bad, solid_rgb(SIZE, 12))
    # Not the first image of its split (only that one is decoded at build): the headers of all are read.
    assert sorted((root / "PNGImages").iterdir()).index(bad) > 1
    with pytest.raises(DataError, match=r"FudanPed00009_mask\.png: mask is 16x16 but its image is 16x12"):
        train_val(data_cfg("pennfudan", root=str(root), val_fraction=0.5))


@pytest.mark.parametrize("missing", ["root", "PedMasks"])
def test_missing_layout_fails_at_build(tmp_path: Path, missing: str) -> None:
    root = pennfudan_layout(tmp_path / "ped", {"a": _two_people()})
    if missing == "PedMasks":
        for file in (root / "PedMasks").iterdir():
            file.unlink()
        (root / "PedMasks").rmdir()
    else:
        root = tmp_path / "elsewhere"
    with pytest.raises(DataError, match=r"data\.root="):
        build_datasets(data_cfg("pennfudan", root=str(root)))
