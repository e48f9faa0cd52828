"""What every shipped person dataset shares: the prepare/cache/augment path, up-front verification, the seeded
split, the evaluation ground truth and the fingerprint used for experiment tracking. Loaders only say how to
read one raw (image, target) and what their source annotations are."""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from masksweep.data.transforms import Target, build_augment, build_prepare
from masksweep.errors import ConfigError, DataError

Sample = tuple[tv_tensors.Image, Target]
T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderOptions:
    """The options every shipped loader takes, checked."""

    hflip: float
    keep_empty: bool
    cache_images: bool

    @classmethod
    def checked(cls, hflip: object, keep_empty: object, cache_images: object) -> LoaderOptions:
        if isinstance(hflip, bool) or not isinstance(hflip, (int, float)) or not 0 <= hflip <= 1:
            raise ConfigError("data.hflip", hflip, "a probability in [0, 1]")
        return cls(float(hflip), bool(keep_empty), bool(cache_images))


class PersonDataset(Dataset[Sample], ABC):
    """Items are (float image in [0, 1], target) as docs/layout.md describes.

    Items are at the image's original size (the model resizes). Subclasses set `image_root`, `image_paths`
    (one per item), `image_ids` and `annotation_files`, count the images they leave out in `dropped`
    (reason -> count), and implement `_load_raw` and `coco_ground_truth`. With `cache_images`, the prepared
    uint8 sample is kept in memory, so each image is decoded once per process; DataLoader workers each hold
    their own cache, so it pays with persistent workers or num_workers=0, and only for datasets that fit in
    memory.
    """

    image_root: Path
    image_paths: list[Path]
    image_ids: list[int]
    annotation_files: list[Path]

    def __init__(self, options: LoaderOptions, *, train: bool) -> None:
        self.train = train
        self.dropped: dict[str, int] = {}
        self._prepare = build_prepare()
        self._augment = build_augment(train, options.hflip)
        self._cache: dict[int, Sample] | None = {} if options.cache_images else None
        self._unreadable: torch.Tensor | None = None  # set by skip_unreadable()
        self._max_unreadable = 0

    @abstractmethod
    def _load_raw(self, index: int) -> Sample:
        """Item `index` at its original size: uint8 image, target from `transforms.make_target`."""

    @abstractmethod
    def coco_ground_truth(self) -> dict[str, Any]:
        """This split's ground truth as a COCO dataset dict (images, annotations, categories: the person
        category only) at original resolution, crowd regions included: what AP is computed against."""

    def source_files(self, index: int) -> list[Path]:
        """The files item `index` is read from (its image; loaders with mask files add them)."""
        return [self.image_paths[index]]

    def skip_unreadable(self, max_bad: int) -> None:
        """From now on an item whose files cannot be read is dropped, once, with a log line naming the file,
        and the next readable item is served in its place; past `max_bad` such items, reading raises
        DataError. For the train split: a training run should not die of one truncated image in 100k, nor
        pay a full decode of the whole set up front. The flags live in shared memory, so DataLoader workers
        and the main process (which reports `unreadable_count()`) see the same drops."""
        self._unreadable = torch.zeros(len(self), dtype=torch.bool).share_memory_()
        self._max_unreadable = max_bad

    def unreadable_count(self) -> int:
        """How many items skip_unreadable() has dropped so far."""
        return 0 if self._unreadable is None else int(self._unreadable.sum())

    def _readable(self, index: int) -> Sample:
        """Item `index`, or (it cannot be read) the next readable one after it."""
        flags = self._unreadable
        assert flags is not None
        for _ in range(len(self)):
            if not flags[index]:
                try:
                    return self._prepared(index)
                except DataError as exc:
                    self._mark_unreadable(index, exc)
            index = (index + 1) % len(self)
        raise DataError(f"none of the {len(self)} images under {self.image_root} can be read")

    def _mark_unreadable(self, index: int, exc: DataError) -> None:
        assert self._unreadable is not None
        self._unreadable[index] = True
        count, limit = self.unreadable_count(), self._max_unreadable
        if count > limit:
            raise DataError(
                f"data.max_bad_images={limit}: {count} train images could not be read, the last: {exc}"
            ) from exc
        log.warning("dropped a train image (%d of at most data.max_bad_images=%d): %s", count, limit, exc)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the annotation files' bytes and the sorted image names.

        Names are taken relative to the image root so the fingerprint does not depend on where the data
        lives.
        """
        digest = hashlib.sha256()
        for ann_file in sorted(set(self.annotation_files)):
            with ann_file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        for name in sorted(path.relative_to(self.image_root).as_posix() for path in self.image_paths):
            digest.update(name.encode() + b"\n")
        return digest.hexdigest()[:16]

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
        image, target = self._prepared(index) if self._unreadable is None else self._readable(index)
        # v2 transforms return new tensors and containers, so the cached sample is never modified.
        return self._augment(image, target)


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


def seeded_split(
    items: Sequence[T], val_fraction: float, seed: int, test_fraction: float = 0.0
) -> tuple[list[T], list[T], list[T]]:
    """Split into (train, val, test) by one seeded permutation.

    val takes the first round(count * val_fraction) positions of the permutation (at least one, and at least
    one item is left for train), test the next round(count * test_fraction) (at least one when the fraction
    is positive). Without a test fraction the train/val split is the same as with one, minus the test items.
    `items` must be in a stable order (e.g. sorted ids), so that the split depends only on the seed.
    """
    count = len(items)
    num_val = min(max(round(count * val_fraction), 1), count - 1) if count > 1 else 0
    num_test = min(max(round(count * test_fraction), 1), count - num_val - 1) if test_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(count).tolist()
    val_positions, test_positions = set(order[:num_val]), set(order[num_val : num_val + max(num_test, 0)])
    train = [item for i, item in enumerate(items) if i not in val_positions | test_positions]
    val = [item for i, item in enumerate(items) if i in val_positions]
    test = [item for i, item in enumerate(items) if i in test_positions]
    return train, val, test


def check_fractions(val_fraction: object, test: object) -> float:
    """The test fraction of a seeded three-way split (0 for `test: null`), after checking both fractions."""
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise ConfigError("data.val_fraction", val_fraction, "a number in (0, 1)")
    if test is None:
        return 0.0
    if isinstance(test, bool) or not isinstance(test, (int, float)) or not 0 < test < 1 - val_fraction:
        raise ConfigError(
            "data.test", test, f"null or a fraction in (0, {1 - val_fraction:g}) held out for test"
        )
    return float(test)
