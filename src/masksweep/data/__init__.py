"""Person instance-segmentation datasets: `build_datasets(data_cfg) -> (train, val)`, `collate`, fingerprints.

Loaders: `synthetic` (generated, then read through the COCO loader), `coco`, `pennfudan`. Items follow the
contract in docs/layout.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from omegaconf import DictConfig
from torch import Tensor

from masksweep.data.base import PersonDataset, Sample, dataset_fingerprint
from masksweep.data.coco import build_coco
from masksweep.data.pennfudan import build_pennfudan
from masksweep.data.synthetic import build_synthetic
from masksweep.data.transforms import Target
from masksweep.errors import ConfigError, DataError

__all__ = ["PersonDataset", "build_datasets", "collate", "dataset_fingerprint"]

_BUILDERS: dict[str, Callable[[DictConfig], tuple[PersonDataset, PersonDataset]]] = {
    "synthetic": build_synthetic,
    "coco": build_coco,
    "pennfudan": build_pennfudan,
}


def build_datasets(data_cfg: DictConfig) -> tuple[PersonDataset, PersonDataset]:
    """(train, val) for the composed `data` config group. Paths are checked here, before any training."""
    builder = _BUILDERS.get(data_cfg.name)
    if builder is None:
        raise ConfigError("data.name", data_cfg.name, ", ".join(_BUILDERS))
    datasets = builder(data_cfg)
    for split, dataset in zip(("train", "val"), datasets, strict=True):
        if len(dataset) == 0:
            sources = ", ".join(str(p) for p in dataset.annotation_files[:1]) or str(dataset.image_root)
            raise DataError(
                f"{sources}: the {split} split has no images (keep_empty={data_cfg.keep_empty}); "
                "expected at least one image with a person"
            )
        if data_cfg.verify:
            dataset.verify()
    return datasets


def collate(batch: Sequence[Sample]) -> tuple[list[Tensor], list[Target]]:
    """Detection models take lists: images may differ in size and targets in instance count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
