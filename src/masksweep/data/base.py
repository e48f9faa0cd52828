"""What every person dataset shares: the prepare/cache/augment path, up-front verification, the seeded split
and the fingerprint used for experiment tracking. Loaders only say how to read one raw (image, target)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchvision import tv_tensors

from masksweep.data.transforms import Target, build_augment, build_prepare
from masksweep.errors import ConfigError, DataError

Sample = tuple[tv_tensors.Image, Target]
T = TypeVar("T")


@dataclass(frozen=True)
class LoaderOptions:
    """The keys every data config has, as the loaders use them."""

    image_size: int
    hflip: float
    keep_empty: bool
    cache_images: bool

    @classmethod
    def from_cfg(cls, data_cfg: DictConfig) -> LoaderOptions:
        image_size, hflip = data_cfg.image_size, data_cfg.hflip
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError("data.image_size", image_size, "an integer >= 1")
        if isinstance(hflip, bool) or not isinstance(hflip, (int, float)) or not 0 <= hflip <= 1:
            raise ConfigError("data.hflip", hflip, "a probability in [0, 1]")
        return cls(image_size, float(hflip), bool(data_cfg.keep_empty), bool(data_cfg.cache_images))


class PersonDataset(Dataset[Sample], ABC):
    """Items are (float image in [0, 1], target) as docs/layout.md describes.

    Subclasses set `image_root`, `image_paths` (one per item) and `annotation_files`, and implement
    `_load_raw`. With `cache_images`, the prepared (resized, uint8) sample is kept in memory, so each image is
    decoded once per process; DataLoader workers each hold their own cache, so it pays with persistent workers
    or num_workers=0, and only for datasets that fit in memory.
    """

    image_root: Path
    image_paths: list[Path]
    annotation_files: list[Path]

    def __init__(self, name: str, options: LoaderOptions, *, train: bool) -> None:
        self.name = name
        self.train = train
        self._prepare = build_prepare(options.image_size)
        self._augment = build_augment(train, options.hflip)
        self._cache: dict[int, Sample] | None = {} if options.cache_images else None

    @abstractmethod
    def _load_raw(self, index: int) -> Sample:
        """Item `index` at its original size: uint8 image, target from `transforms.make_target`."""

    def __len__(self) -> int:
        return len(self.image_paths)

    def _prepared(self, index: int) -> Sample:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self._prepare(*self._load_raw(index))
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> Sample:
        image, target = self._prepared(index)
        # v2 transforms return new tensors and containers, so the cached sample is never modified.
        return self._augment(image, target)

    def verify(self) -> None:
        """Decode every item now, so a bad file fails the run before training (and fills the cache if on)."""
        for index in range(len(self)):
            self._prepared(index)


def existing_path(value: str, key: str, expected: str, *, is_dir: bool) -> Path:
    """The absolute path for config `key` (relative to the working directory), or DataError if it is absent.

    Checked when the datasets are built, so a typo fails the run before any training.
    """
    if not value:
        raise DataError(f"{key}={value!r}: no path given; expected {expected}")
    path = Path(value).expanduser().absolute()
    if not (path.is_dir() if is_dir else path.is_file()):
        raise DataError(f"{key}={value!r}: {path} does not exist; expected {expected}")
    return path


def seeded_split(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split into (train, val) by a seeded permutation; both sides get at least one item when there are two.

    `items` must be in a stable order (e.g. sorted ids), so that the split depends only on the seed.
    """
    count = len(items)
    num_val = min(max(round(count * val_fraction), 1), count - 1) if count > 1 else 0
    order = np.random.default_rng(seed).permutation(count)
    val_positions = set(order[:num_val].tolist())
    train = [item for i, item in enumerate(items) if i not in val_positions]
    val = [item for i, item in enumerate(items) if i in val_positions]
    return train, val


def dataset_fingerprint(dataset: PersonDataset) -> str:
    """16 hex digits of sha256 over the annotation files' bytes and the sorted image names.

    Names are taken relative to the image root so the fingerprint does not depend on where the data lives.
    """
    digest = hashlib.sha256()
    for ann_file in sorted(dataset.annotation_files):
        with ann_file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    for name in sorted(path.relative_to(dataset.image_root).as_posix() for path in dataset.image_paths):
        digest.update(name.encode() + b"\n")
    return digest.hexdigest()[:16]
