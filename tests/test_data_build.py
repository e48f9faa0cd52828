"""build_datasets / collate / dataset_fingerprint as the rest of masksweep uses them (docs/layout.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from data_factories import data_cfg
from masksweep.data import build_datasets, collate, dataset_fingerprint
from masksweep.errors import ConfigError


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # the shipped relative cache_dir resolves against the working directory
    return data_cfg("synthetic", num_train=6, num_val=3, image_size=48)


def test_synthetic_items_follow_the_contract(synthetic) -> None:
    train, val = build_datasets(synthetic)
    assert (len(train), len(val)) == (6, 3)
    assert train.name == val.name == "synthetic"
    assert all(p.is_relative_to(Path.cwd() / ".cache/masksweep/synthetic") for p in train.image_paths)
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
    train, _ = build_datasets(synthetic)
    images, targets = next(iter(DataLoader(train, batch_size=4, collate_fn=collate)))
    assert isinstance(images, list) and len(images) == 4
    assert isinstance(targets, list) and [t["image_id"] for t in targets] == [1, 2, 3, 4]


def test_cached_and_uncached_datasets_give_the_same_samples(synthetic) -> None:
    _, cached = build_datasets(synthetic)
    synthetic.cache_images = False
    _, uncached = build_datasets(synthetic)
    for index in range(len(cached)):
        for first, second in (cached[index], cached[index]), (cached[index], uncached[index]):
            assert torch.equal(first[0], second[0])
            assert torch.equal(first[1]["masks"], second[1]["masks"])


def test_fingerprint_is_stable_and_tells_splits_and_data_apart(synthetic) -> None:
    train, val = build_datasets(synthetic)
    again, _ = build_datasets(synthetic)
    fingerprint = dataset_fingerprint(train)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert dataset_fingerprint(again) == fingerprint
    assert dataset_fingerprint(val) != fingerprint
    synthetic.seed = 1
    assert dataset_fingerprint(build_datasets(synthetic)[0]) != fingerprint


def test_verify_fills_the_image_cache(synthetic) -> None:
    synthetic.verify = True
    train, _ = build_datasets(synthetic)
    train.image_paths[2].write_bytes(b"no longer a png")
    assert train[2][0].shape == (3, 48, 48)  # decoded once, during verify; never read again


def test_unknown_dataset_name_is_a_config_error(synthetic) -> None:
    synthetic.name = "imagenet"
    with pytest.raises(
        ConfigError, match=r"data\.name='imagenet' is invalid; allowed: synthetic, coco, pennfudan"
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
        assert cfg.name == name
        assert {"image_size", "hflip", "keep_empty", "verify", "cache_images"} <= set(cfg)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("image_size", 0, "an integer >= 1"),
        ("image_size", 64.5, "an integer >= 1"),
        ("hflip", 1.5, "a probability"),
    ],
)
def test_common_keys_are_checked(synthetic, key: str, value: object, allowed: str) -> None:
    synthetic[key] = value
    with pytest.raises(ConfigError, match=rf"data\.{key}={value}.*{allowed}"):
        build_datasets(synthetic)
