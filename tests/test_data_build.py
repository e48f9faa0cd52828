"""build_datasets / collate / dataset_fingerprint as the rest of masksweep uses them (docs/layout.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from data_factories import data_cfg
from masksweep.cache import cache_dir
from masksweep.data import build_datasets, collate, dataset_fingerprint
from masksweep.data.base import seeded_split
from masksweep.errors import ConfigError


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    return data_cfg("synthetic", num_train=6, num_val=3, image_size=48)


def test_synthetic_items_follow_the_contract(synthetic) -> None:
    splits = build_datasets(synthetic)
    train, val = splits.train, splits.val
    assert (len(train), len(val)) == (6, 3) and splits.test is None
    # cache_dir: null is the user's cache (a test's own, conftest), whatever the working directory.
    assert all(p.is_relative_to(cache_dir() / "synthetic") for p in train.image_paths)
    for dataset in (train, val):
        image, target = dataset[0]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
        assert image.shape == (3, 48, 48) and image.min() >= 0.0 and image.max() <= 1.0
        count = len(target["boxes"])
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (count, 4)
        assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
        assert target["masks"].shape == (count, 48, 48)
        assert target["labels"].dtype == torch.int64 and target["labels"].eq(1).all()
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].shape == (count,)
        assert target["area"].dtype == torch.float32
        assert torch.equal(target["area"], target["masks"].sum(dim=(1, 2)).float())
        assert isinstance(target["image_id"], int)


def test_collate_batches_as_lists_through_a_dataloader(synthetic) -> None:
    train = build_datasets(synthetic).train
    images, targets = next(iter(DataLoader(train, batch_size=4, collate_fn=collate)))
    assert isinstance(images, list) and len(images) == 4
    assert isinstance(targets, list) and [t["image_id"] for t in targets] == [1, 2, 3, 4]


def test_cached_and_uncached_datasets_give_the_same_samples(synthetic) -> None:
    cached = build_datasets(synthetic).val
    synthetic.cache_images = False
    uncached = build_datasets(synthetic).val
    for index in range(len(cached)):
        for first, second in (cached[index], cached[index]), (cached[index], uncached[index]):
            assert torch.equal(first[0], second[0])
            assert torch.equal(first[1]["masks"], second[1]["masks"])


def test_fingerprint_is_stable_and_tells_splits_and_data_apart(synthetic) -> None:
    splits = build_datasets(synthetic)
    train, val = splits.train, splits.val
    again = build_datasets(synthetic).train
    fingerprint = dataset_fingerprint(train)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert dataset_fingerprint(again) == fingerprint
    assert dataset_fingerprint(val) != fingerprint
    synthetic.seed = 1
    assert dataset_fingerprint(build_datasets(synthetic).train) != fingerprint


def test_verify_fills_the_image_cache(synthetic) -> None:
    synthetic.verify = True
    train = build_datasets(synthetic).train
    train.image_paths[2].write_bytes(b"no longer a png")
    assert train[2][0].shape == (3, 48, 48)  # decoded once, during verify; never read again


def test_unknown_target_is_a_config_error(synthetic) -> None:
    synthetic._target_ = "masksweep.data.imagenet"
    with pytest.raises(ConfigError, match=r"data\._target_='masksweep\.data\.imagenet' is invalid") as error:
        build_datasets(synthetic)
    assert "\n" not in str(error.value)


def test_a_key_the_target_does_not_take_is_a_config_error(synthetic) -> None:
    synthetic.colour = "blue"
    with pytest.raises(
        ConfigError, match=r"colour.*masksweep\.data\.synthetic\.synthetic\(split=\.\.\.\) accepts"
    ):
        build_datasets(synthetic)


@pytest.mark.parametrize("key", ["num_train", "num_val"])
def test_synthetic_counts_must_be_positive(synthetic, key: str) -> None:
    synthetic[key] = 0
    with pytest.raises(ConfigError, match=rf"data\.{key}=0"):
        build_datasets(synthetic)


def test_shipped_configs_have_the_common_keys() -> None:
    for name in ("synthetic", "coco", "pennfudan"):
        cfg = data_cfg(name)
        assert cfg.name == name and cfg._target_ == f"masksweep.data.{name}.{name}"
        assert {"hflip", "keep_empty", "verify", "cache_images", "test"} <= set(cfg)
        assert cfg.test is None  # a test split is opt-in


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("image_size", 0, "an integer >= 1 \\(the generated images' side\\)"),
        ("image_size", 64.5, "an integer >= 1"),
        ("test", 0, "an integer >= 1 \\(the number of test images\\)"),
        ("hflip", 1.5, "a probability"),
    ],
)
def test_common_keys_are_checked(synthetic, key: str, value: object, allowed: str) -> None:
    synthetic[key] = value
    with pytest.raises(ConfigError, match=rf"data\.{key}={value}.*{allowed}"):
        build_datasets(synthetic)


def test_synthetic_test_split_is_its_own_stream(synthetic) -> None:
    synthetic.test = 2
    splits = build_datasets(synthetic)
    assert splits.test is not None and len(splits.test) == 2
    pixels = {split: [d[i][0] for i in range(len(d))] for split, d in vars(splits).items()}
    for image in pixels["test"]:
        assert not any(torch.equal(image, other) for other in pixels["train"] + pixels["val"])
    synthetic.test = None
    assert build_datasets(synthetic).val.image_paths == splits.val.image_paths  # val is unchanged by it


def test_loaded_and_dropped_images_are_logged_per_split(synthetic, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="masksweep.data"):
        build_datasets(synthetic)
    lines = [r.getMessage() for r in caplog.records]
    assert "data=synthetic: train split: 6 images loaded, none dropped" in lines
    assert "data=synthetic: val split: 3 images loaded, none dropped" in lines


@pytest.mark.parametrize("test_fraction", [0.0, 0.25])
def test_seeded_split_is_disjoint_and_test_leaves_val_alone(test_fraction: float) -> None:
    items = list(range(20))
    train, val, test = seeded_split(items, 0.2, 7, test_fraction)
    assert sorted(train + val + test) == items and len(test) == round(20 * test_fraction)
    assert val == seeded_split(items, 0.2, 7)[1]
