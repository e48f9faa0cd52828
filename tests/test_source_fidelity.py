"""Evaluation and export in the source dataset's own frame (issue 15): AP against the annotation file as
plain pycocotools computes it, predictions with the dataset's ids at original size, the model's own
aspect-keeping resize, and datasets plugged in by `_target_`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_factories import (
    CocoFile,
    compressed_rle,
    data_cfg,
    rect_mask,
    rect_polygon,
    save_image,
    uncompressed_rle,
    xywh,
)
from masksweep import engine
from masksweep.artifacts import OverlaySamples, save_overlays
from masksweep.data import build_datasets, collate, ground_truth
from masksweep.errors import DataError
from masksweep.metrics import COCOEvaluator
from masksweep.postprocess import instance_map

PERSON_ID = 7
CATEGORIES = [{"id": 1, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": PERSON_ID, "name": "person"}]
# image id -> (file name, width, height): three non-square sizes and a square one, two in subfolders.
IMAGES = {
    11: ("a.png", 96, 64),
    12: ("sub/b.png", 64, 80),
    13: ("c.png", 80, 48),
    14: ("sub/deeper/d.png", 72, 72),
}


def _coco_fixture(root: Path) -> Path:
    """Per image: a polygon person and an RLE person (compressed and uncompressed in turn), one image with a
    crowd region, dogs and cats that are not persons. Annotated areas are the box areas, as some exporters
    write them, so that AP sees the file's areas and not recomputed ones."""
    coco = CocoFile(CATEGORIES)
    rng = np.random.default_rng(0)
    for image_id, (name, width, height) in IMAGES.items():
        pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        left = ((height // 8, height * 7 // 8), (width // 10, width // 2))
        right = ((height // 4, height - 2), (width // 2 + 3, width - 4))
        for rows, cols in (left, right):
            pixels[rows[0] : rows[1], cols[0] : cols[1]] = (230, 180, 120)
        save_image(root / name, Image.fromarray(pixels))
        coco.image(image_id, name, width, height)
        coco.annotation(image_id, rect_polygon(*left), xywh(rect_mask((height, width), *left)))
        right_mask = rect_mask((height, width), *right)
        rle = compressed_rle(right_mask) if image_id % 2 else uncompressed_rle(right_mask)
        coco.annotation(image_id, rle, xywh(right_mask))
        coco.annotation(image_id, rect_polygon((0, 6), (0, 6)), [0, 0, 6, 6], category="dog")
        coco.annotation(
            image_id, rect_polygon((1, 5), (width - 6, width - 1)), [width - 6, 1, 5, 4], category="cat"
        )
    crowd = rect_mask((64, 96), (50, 64), (0, 40))
    coco.annotation(11, uncompressed_rle(crowd), xywh(crowd), iscrowd=1)
    return coco.write(root / "annotations" / "instances.json")


@pytest.fixture
def coco_source(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    return _coco_fixture(root), root


def _pycocotools_ap(ann_file: Path, results_file: Path, image_ids: list[int]) -> dict[str, float]:
    """What a user computes from the source file and the exported results, with nothing from masksweep."""
    gt = COCO(str(ann_file))
    dt = gt.loadRes(str(results_file))
    aps = {}
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.catIds = [PERSON_ID]
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        for suffix, value in zip(("", "_50", "_75"), evaluator.stats[:3], strict=True):
            aps[f"ap_{iou_type}{suffix}"] = max(float(value), 0.0)
    return aps


def _check_export(results: list[dict], sizes: dict[int, tuple[int, int]]) -> None:
    """Category ids are the dataset's; every box and mask fits its image's original (width, height)."""
    assert results
    assert {r["category_id"] for r in results} == {PERSON_ID}
    for r in results:
        width, height = sizes[r["image_id"]]
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert r["segmentation"]["size"] == [height, width]
        assert 0 <= r["score"] <= 1


class JitteredTruth(torch.nn.Module):
    """A stand-in model that answers with the ground truth, shifted and with distractors: AP in (0, 1)."""

    def __init__(self, targets: dict[int, dict]) -> None:
        super().__init__()
        self.targets = targets
        self.calls: list[torch.Size] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            self.calls.append(image.shape)
            target = next(t for t in self.targets.values() if t["masks"].shape[-2:] == image.shape[-2:])
            masks = target["masks"].float()
            shifted = torch.roll(masks, shifts=(1, 2), dims=(1, 2))
            boxes = target["boxes"].as_subclass(torch.Tensor).clone()
            wrong = boxes.clone()
            wrong[:, 2:] = wrong[:, :2] + 4
            outputs.append(
                {
                    "boxes": torchvision.ops.clip_boxes_to_image(  # as the real model's postprocess does
                        torch.cat([boxes + torch.tensor([2.0, 1.0, 2.0, 1.0]), wrong]), image.shape[-2:]
                    ),
                    "labels": torch.ones(2 * len(boxes), dtype=torch.int64),
                    "scores": torch.linspace(0.9, 0.3, 2 * len(boxes)),
                    "masks": torch.cat([shifted, torch.zeros_like(masks)])[:, None],
                }
            )
        return outputs


def test_ap_equals_plain_pycocotools_on_the_source_file(coco_source, tmp_path: Path) -> None:
    ann_file, root = coco_source
    split = {"ann_file": str(ann_file), "image_root": str(root)}
    val = build_datasets(data_cfg("coco", train=split, val=split)).val
    targets = {val[i][1]["image_id"]: val[i][1] for i in range(len(val))}
    assert sorted(targets) == sorted(IMAGES)
    for backend in ("faster_coco_eval", "pycocotools"):
        evaluator = COCOEvaluator(backend, ground_truth=ground_truth(val))
        loader = torch.utils.data.DataLoader(val, batch_size=3, collate_fn=collate)
        metrics = engine.evaluate(JitteredTruth(targets), loader, torch.device("cpu"), evaluator)
        assert 0.05 < metrics["ap_segm"] < 0.95 and 0.05 < metrics["ap_bbox"] < 0.95
        results_file = evaluator.write_results(tmp_path / f"{backend}.json")
        expected = _pycocotools_ap(ann_file, results_file, sorted(IMAGES))
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-9), (backend, key)
        _check_export(json.loads(results_file.read_text()), {i: (w, h) for i, (_, w, h) in IMAGES.items()})


def test_ground_truth_is_the_files_own(coco_source) -> None:
    ann_file, root = coco_source
    split = {"ann_file": str(ann_file), "image_root": str(root)}
    splits = build_datasets(data_cfg("coco", train=split, val=split))
    truth = ground_truth(splits.val)
    source = json.loads(ann_file.read_text())
    persons = [a for a in source["annotations"] if a["category_id"] == PERSON_ID]
    assert truth["categories"] == [{"id": PERSON_ID, "name": "person"}]
    by_id = sorted(truth["annotations"], key=lambda a: a["id"])
    assert by_id == sorted(persons, key=lambda a: a["id"])  # areas, crowd flag, polygons and RLE verbatim
    assert [a["iscrowd"] for a in truth["annotations"]].count(1) == 1
    assert all(t["iscrowd"].sum() == 0 for t in (splits.train[i][1] for i in range(len(splits.train))))


@pytest.mark.slow
def test_a_trial_exports_predictions_pycocotools_scores_like_masksweep(
    make_cfg, coco_source, workdir, caplog
) -> None:
    from masksweep.train import train

    ann_file, root = coco_source
    cfg = make_cfg(
        "trainer=smoke",
        "epochs=1",
        "data=coco",
        f"data.train.ann_file={ann_file}",
        f"data.train.image_root={root}",
        f"data.val.ann_file={ann_file}",
        f"data.val.image_root={root}",
        "model.min_size=64",
        "model.max_size=96",
        "++model.pretrain.enabled=false",
        "trainer.limit_val_batches=null",  # every val image, so the split is the file's images
        "tracking=none",
        "eval.export_predictions=true",
        f"checkpoint.dir={workdir / 'ckpt'}",
        tiny=False,
    )
    with caplog.at_level(logging.INFO, logger="masksweep.train"):
        metrics = train(cfg)
    results_file = workdir / "ckpt" / "predictions.json"
    # The run's last line says where everything went.
    assert caplog.records[-1].getMessage() == (
        f"MLflow run (tracking=none); run directory {workdir / 'ckpt'}; predictions {results_file}"
    )
    results = json.loads(results_file.read_text())
    _check_export(results, {i: (w, h) for i, (_, w, h) in IMAGES.items()})
    assert {r["image_id"] for r in results} <= set(IMAGES)
    expected = _pycocotools_ap(ann_file, results_file, sorted(IMAGES))
    for key, value in expected.items():
        assert metrics[f"val/{key}"] == pytest.approx(value, abs=1e-9), key


# Penn-Fudan: (width, height) of non-square images, sized so that the model's integer resize keeps the ratio.
PENNFUDAN_SIZES = {"FudanPed00001": (240, 160), "FudanPed00002": (150, 250), "PennPed00003": (200, 130)}


def _pennfudan_fixture(root: Path) -> Path:
    for stem, (width, height) in PENNFUDAN_SIZES.items():
        labels = np.zeros((height, width), dtype=np.uint8)
        labels[height // 6 : height * 5 // 6, width // 8 : width // 2] = 1
        labels[height // 3 : height - 4, width // 2 + 4 : width - 6] = 2
        pixels = np.full((height, width, 3), 60, dtype=np.uint8)
        pixels[labels > 0] = (200, 150, 100)
        save_image(root / "PNGImages" / f"{stem}.png", Image.fromarray(pixels))
        save_image(root / "PedMasks" / f"{stem}_mask.png", Image.fromarray(labels))
    return root


def test_pennfudan_model_input_keeps_the_aspect_and_outputs_come_back_at_original_size(
    make_cfg, tmp_path: Path
) -> None:
    root = _pennfudan_fixture(tmp_path / "PennFudanPed")
    cfg = make_cfg(
        "data=pennfudan",
        f"data.root={root}",
        "data.val_fraction=0.5",
        "model.min_size=128",
        "model.max_size=192",
        "++model.pretrain.enabled=false",
        tiny=False,
    )
    splits = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True)).eval()
    for dataset in (splits.train, splits.val):
        for index in range(len(dataset)):
            image, target = dataset[index]
            width, height = PENNFUDAN_SIZES[dataset.image_paths[index].stem]
            assert image.shape[-2:] == (height, width) and target["masks"].shape[-2:] == (height, width)
            with torch.inference_mode():
                fed = model.transform([image])[0].image_sizes[0]  # what the backbone sees, before padding
            assert fed[1] / fed[0] == pytest.approx(width / height, rel=0.01)
            assert max(fed) <= 192 and (min(fed) >= 127 or max(fed) == 192)

    samples = OverlaySamples(len(splits.val))
    evaluator = COCOEvaluator(ground_truth=ground_truth(splits.val))
    loader = torch.utils.data.DataLoader(splits.val, batch_size=2, collate_fn=collate)
    engine.evaluate(model, loader, torch.device("cpu"), evaluator, on_batch=samples)
    assert {image["id"] for image in evaluator.ground_truth()["images"]} == set(splits.val.image_ids)
    paths = save_overlays(samples.samples, tmp_path / "overlays", score_threshold=0.0, mask_threshold=0.5)
    detections = 0
    for (image, _, output), path in zip(samples.samples, paths, strict=True):
        height, width = image.shape[-2:]
        detections += len(output["masks"])
        assert output["masks"].shape[-2:] == (height, width)
        assert instance_map(output, score_threshold=0.0).shape == (height, width)
        assert Image.open(path).size == (3 * width, height)  # image | overlay | instance map
    assert detections > 0  # the masks checked above were pasted by the model, not an empty stand-in


def _user_config_dir(tmp_path: Path, target: str) -> Path:
    config_dir = tmp_path / "myconf"
    (config_dir / "data").mkdir(parents=True)
    (config_dir / "data" / "shapes.yaml").write_text(
        f"_target_: {target}\nname: shapes\nnum_images: 4\nwidth: 80\nheight: 56\nseed: 3\n"
    )
    return config_dir


@pytest.mark.slow
def test_a_user_dataset_class_plugs_in_with_one_yaml_file(make_cfg, tmp_path: Path, workdir: Path) -> None:
    from masksweep.train import train

    config_dir = _user_config_dir(tmp_path, "shapes_dataset.ShapesDataset")
    cfg = make_cfg(
        f"hydra.searchpath=[file://{config_dir}]",
        "data=shapes",
        "trainer=smoke",
        "epochs=1",
        "model.min_size=56",
        "model.max_size=80",
        "++model.pretrain.enabled=false",
        "tracking=none",
        f"checkpoint.dir={workdir / 'ckpt'}",
        tiny=False,
    )
    splits = build_datasets(cfg.data)
    assert type(splits.train).__name__ == "ShapesDataset" and splits.test is None
    metrics = train(cfg)
    assert set(metrics) >= {"val/ap_segm", "val/iou_global", "final/loss_last_epoch"}
    assert np.isfinite(metrics["final/loss_last_epoch"])


def test_a_dataset_breaking_the_item_contract_fails_with_one_line(make_cfg, tmp_path: Path) -> None:
    config_dir = _user_config_dir(tmp_path, "shapes_dataset.BrokenLabelsDataset")
    cfg = make_cfg(f"hydra.searchpath=[file://{config_dir}]", "data=shapes", tiny=False)
    with pytest.raises(DataError) as error:
        build_datasets(cfg.data)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("data=shapes (shapes_dataset.BrokenLabelsDataset), train split, item 0:")
    assert "target['labels']" in message and "float32" in message and "expected int64" in message


def test_masks_pasted_by_pycocotools_match_the_export_size(coco_source) -> None:
    """The source file's own polygons and RLE decode at each image's original size (what segm AP reads)."""
    ann_file, _ = coco_source
    gt = COCO(str(ann_file))
    for annotation in gt.dataset["annotations"]:
        _, width, height = IMAGES[annotation["image_id"]]
        assert gt.annToMask(annotation).shape == (height, width)
        assert mask_utils.area(gt.annToRLE(annotation)) > 0
