"""Predictions on image files: instance maps at the original resolution, overlays, COCO results JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from masksweep.inference import TrainedModel, find_images, predict_files


class HalvesModel(torch.nn.Module):
    """Controlled outputs: a left-half person (score 0.6), a right-half person (0.9), a weak one (0.2)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            _, h, w = image.shape
            masks = torch.zeros(3, 1, h, w)
            masks[0, :, :, : w // 2] = 0.8
            masks[1, :, :, w // 2 :] = 0.7
            masks[2] = 0.9
            boxes = torch.tensor([[0, 0, w / 2, h], [w / 2, 0, w, h], [0, 0, w, h]], dtype=torch.float32)
            outputs.append(
                {
                    "boxes": boxes,
                    "labels": torch.ones(3, dtype=torch.int64),
                    "scores": torch.tensor([0.6, 0.9, 0.2]),
                    "masks": masks,
                }
            )
        return outputs


def test_predict_writes_maps_overlays_and_coco_json(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    Image.new("RGB", (100, 60), (200, 10, 10)).save(inputs / "a.png")
    Image.new("L", (40, 80), 128).save(inputs / "nested" / "b.jpg")  # grayscale, in a subfolder
    (inputs / "broken.png").write_bytes(b"not an image")
    (inputs / "notes.txt").write_text("ignored")

    paths = find_images([inputs])
    assert [p.name for p in paths] == ["a.png", "broken.png", "b.jpg"]
    summary = predict_files(
        TrainedModel(HalvesModel(), {}),
        paths,
        tmp_path / "out",
        torch.device("cpu"),
        batch_size=2,
        progress=False,
    )
    assert [p.name for p, _ in summary.skipped] == ["broken.png"] and "broken.png" in summary.skipped[0][1]
    assert len(summary.written) == 2

    ids = np.array(Image.open(tmp_path / "out" / "a_instances.png"))
    assert ids.shape == (60, 100) and ids.dtype == np.uint8
    # ids by descending score: right half (0.9) is 1, left half (0.6) is 2; 0.2 is below the threshold.
    assert (ids[:, 55:] == 1).all() and (ids[:, :45] == 2).all()
    overlay = np.array(Image.open(tmp_path / "out" / "b_overlay.png"))
    assert overlay.shape == (80, 40, 3)

    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    image_ids = json.loads((tmp_path / "out" / "image_ids.json").read_text())
    assert sorted(Path(p).name for p in image_ids.values()) == ["a.png", "b.jpg"]
    assert len(results) == 4  # two kept instances per image
    sizes = {1: (60, 100), 2: (80, 40)}
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}],
    }
    gt.createIndex()
    dt = gt.loadRes(str(tmp_path / "out" / "predictions.json"))
    best_a = max((a for a in dt.anns.values() if a["image_id"] == 1), key=lambda a: a["score"])
    mask = dt.annToMask(best_a)
    assert mask.shape == (60, 100) and mask[:, 55:].all() and not mask[:, :45].any()
    assert best_a["bbox"] == [50.0, 0.0, 50.0, 60.0]


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("masksweep")), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_evaluate_and_predict_a_logged_run(make_cfg, workdir: Path, synthetic_cache: Path) -> None:
    from mlflow import MlflowClient

    from masksweep.tracking import default_store
    from masksweep.train import train

    trained = train(make_cfg("data.hflip=0.5"))
    run_id = trained["run_id"]

    assert (
        cli(
            "evaluate",
            "--run",
            run_id,
            "data.num_val=2",
            "data.image_size=64",
            f"data.cache_dir={synthetic_cache}",
        ).returncode
        == 0
    )
    logged = MlflowClient(default_store()[0]).get_run(run_id).data.metrics
    for key in ("ap_bbox", "ap_segm", "iou_global", "iou_image_mean", "iou_instance_mean"):
        assert logged[f"eval/synthetic/{key}"] == trained[f"val/{key}"] == logged[f"val/{key}"], key

    val_images = next(synthetic_cache.glob("val-*"))
    assert cli("predict", "--run", run_id, str(val_images), "--out", str(workdir / "pred")).returncode == 0
    written = sorted(p.name for p in (workdir / "pred").iterdir())
    assert "predictions.json" in written and sum(n.endswith("_instances.png") for n in written) == 2
