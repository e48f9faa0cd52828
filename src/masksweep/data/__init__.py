"""Person instance-segmentation datasets: `build_datasets(data_cfg) -> Splits`, `collate`, fingerprints.

A data config names its dataset with `_target_`, as model configs do: a callable (a dataset class or a
builder function) that `build_datasets` calls once per split as `target(split="train"|"val"|"test",
**keys)`, with every key of the config except `_target_`, `name`, `verify` and `max_bad_images` (which
masksweep reads). The
shipped ones are `masksweep.data.synthetic.synthetic`, `masksweep.data.coco.coco` and
`masksweep.data.pennfudan.pennfudan`; a user's own class plugs in the same way from their own package. The
test split is built only when `data.test` is set, and is never used for pruning or selection.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from masksweep.data.base import PersonDataset, Sample
from masksweep.data.contract import check_item
from masksweep.data.decoded import check_files_decode
from masksweep.data.transforms import Target
from masksweep.errors import ConfigError, DataError

__all__ = [
    "PersonDataset",
    "Splits",
    "build_datasets",
    "build_split",
    "collate",
    "dataset_fingerprint",
    "dropped_while_reading",
    "ground_truth",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Keys masksweep itself reads; every other key of the data config goes to the target.
_OWN_KEYS = ("_target_", "name", "verify", "max_bad_images")
# data.max_bad_images for a user's data config without the key: a few bad files are dropped, not a pattern.
DEFAULT_MAX_BAD_IMAGES = 10


@dataclass(frozen=True)
class Splits:
    """The datasets of one data config. `test` is None unless `data.test` is set."""

    train: Dataset
    val: Dataset
    test: Dataset | None = None


def build_datasets(data_cfg: DictConfig) -> Splits:
    """The splits of the composed `data` config group: train, val, and test when `data.test` is set.

    Paths are checked, and the first item of each split against the item contract (every item with
    `verify`), here, before any training; so are every image's header (see `build_split`). Logs how many
    images each split loaded and dropped, and why."""
    test = data_cfg.get("test") is not None
    built = {split: build_split(data_cfg, split) for split in SPLIT_NAMES if split != "test" or test}
    name = _target_of(data_cfg)[0]
    for split, dataset in built.items():
        _log_loaded(name, split, dataset)
    return Splits(built["train"], built["val"], built.get("test"))


def build_split(data_cfg: DictConfig, split: str) -> Dataset:
    """One split ("train", "val" or "test"), checked as `build_datasets` checks it.

    The shipped loaders check every image's file and header (its size against the annotation's, a mask's
    against its image's) as they index it. Then val and test images are decoded in full, remembered in the
    user's cache (`data/decoded.py`), while a train image that fails to decode later is dropped with its name,
    up to `data.max_bad_images`. Measured on the 2-core CPU, files in the page cache: a 20k-image COCO index
    (64 px PNGs) is built in 0.6 s with the header checks, 0.1 s without; decoding all 20k in full takes 1.5 s
    the first time and 0.07 s once remembered. A 640x480 JPEG's header takes 0.07 ms and a full decode ~4 ms,
    so COCO's 5k val images are decoded once in ~20 s, and COCO's 118k train images would take ~8 min: hence
    train images are only dropped when they fail."""
    name, target, builder, kwargs = _target_of(data_cfg)
    if split == "test" and kwargs.get("test") is None:
        raise ConfigError("data.test", None, f"a test split for data={name} (see its config for the form)")
    dataset = builder(split=split, **kwargs)
    where = f"data={name} ({target}), {split} split"
    if len(dataset) == 0:
        sources = getattr(dataset, "annotation_files", [])[:1] or [getattr(dataset, "image_root", "")]
        raise DataError(
            f"{where}: no images in {sources[0]} (keep_empty={kwargs.get('keep_empty')}); "
            "expected at least one image with a person"
        )
    count = len(dataset) if data_cfg.get("verify", False) else 1
    with _rng_untouched():  # a train item's random flip must not shift the seeded run's random stream
        for index in range(count):
            check_item(dataset[index], f"{where}, item {index}")
    if isinstance(dataset, PersonDataset):
        if split == "train":
            dataset.skip_unreadable(int(data_cfg.get("max_bad_images", DEFAULT_MAX_BAD_IMAGES)))
        else:
            files = [f for index in range(len(dataset)) for f in dataset.source_files(index)]
            check_files_decode(files, where)
    return dataset


def dropped_while_reading(dataset: Dataset) -> int:
    """Train images dropped so far because they could not be read (0 for a dataset that does not drop)."""
    method = getattr(dataset, "unreadable_count", None)
    return int(method()) if callable(method) else 0


def _target_of(data_cfg: DictConfig) -> tuple[str, str, Callable[..., Dataset], dict[str, Any]]:
    """(display name, target path, the callable, its keyword arguments), checked against its signature."""
    from hydra.utils import get_object

    target = data_cfg.get("_target_")
    expected = "the import path of a dataset class or builder, e.g. masksweep.data.coco.coco"
    if not isinstance(target, str) or not target:
        raise ConfigError("data._target_", target, expected)
    try:
        builder = get_object(target)
    except Exception as exc:  # get_object reports any import failure as ImportError or ValueError
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError("data._target_", target, f"{expected} ({reason})") from exc
    if not callable(builder):
        raise ConfigError("data._target_", target, f"{expected} (it is not callable)")
    kwargs = {
        str(k): v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in _OWN_KEYS
    }
    try:
        inspect.signature(builder).bind(split="train", **kwargs)
    except TypeError as exc:
        raise ConfigError(
            "data", f"{target} with keys {sorted(kwargs)}", f"keys that {target}(split=...) accepts ({exc})"
        ) from None
    except ValueError:  # a builtin without a signature: let the call itself say what is wrong
        pass
    return str(data_cfg.get("name") or target.rsplit(".", 1)[-1]), target, builder, kwargs


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def _log_loaded(name: str, split: str, dataset: Dataset) -> None:
    """Images loaded, and images left out with the reason, for one split."""
    dropped = getattr(dataset, "dropped", None)
    if dropped is None:
        detail = "dropped images not reported by the dataset"
    elif dropped:
        detail = "dropped " + ", ".join(f"{count} ({reason})" for reason, count in sorted(dropped.items()))
    else:
        detail = "none dropped"
    log.info("data=%s: %s split: %d images loaded, %s", name, split, len(dataset), detail)


def ground_truth(dataset: Dataset) -> dict[str, Any] | None:
    """The split's COCO ground truth at original resolution (the source file's own annotations for COCO),
    or None for a dataset without `coco_ground_truth()`: the evaluator then builds it from the targets."""
    method = getattr(dataset, "coco_ground_truth", None)
    return method() if callable(method) else None


def dataset_fingerprint(dataset: Dataset) -> str:
    """The dataset's own `fingerprint()` (the shipped ones hash their annotation files and image names).

    For a dataset without one: a hash of its class and length, which tells datasets apart but not content.
    """
    method = getattr(dataset, "fingerprint", None)
    if callable(method):
        return str(method())
    cls = type(dataset)
    return hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}:{len(dataset)}".encode()).hexdigest()[:16]


def collate(batch: Sequence[Sample]) -> tuple[list[Tensor], list[Target]]:
    """Detection models take lists: images may differ in size and targets in instance count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
