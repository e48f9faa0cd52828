"""Issue 21: a YAML error is one line, a subset evaluation says so, data faults surface before the expensive
work (or are dropped by name), and the README's install check never pretrains."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import masksweep.model
import masksweep.train
from conftest import REPO
from data_factories import (
    CocoFile,
    compressed_rle,
    pennfudan_layout,
    rect_mask,
    rect_polygon,
    save_image,
    xywh,
)
from masksweep.configs import compose_train
from masksweep.errors import DataError, MasksweepError
from masksweep.train import train

TRAIN = [sys.executable, "-c", "from masksweep.train import main; main()"]
SIZE = 64


def _bad_experiment(config_dir: Path) -> Path:
    bad = config_dir / "experiment" / "typo.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text("# @package _global_\nlr: 0.01\noptimizer:\n  momentum: 0.9: oops\n")
    return bad


def test_a_yaml_typo_in_a_config_dir_is_one_line_naming_the_file(workdir: Path) -> None:
    _bad_experiment(workdir / "myconf")
    args = [*TRAIN, "--config-dir", "myconf", "+experiment=typo", "tracking=none"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "masksweep-train: config error: myconf/experiment/typo.yaml line 4, column 16: "
        "mapping values are not allowed in this context"
    ]
    # HYDRA_FULL_ERROR=1 keeps the parser's own traceback, for whoever debugs the parser.
    full = subprocess.run(
        args, cwd=workdir, capture_output=True, text=True, env={**env, "HYDRA_FULL_ERROR": "1"}, timeout=300
    )
    assert full.returncode != 0 and "Traceback" in full.stderr and "ScannerError" in full.stderr


def test_a_yaml_typo_reached_by_compose_is_one_line_too(workdir: Path) -> None:
    """The `masksweep` commands that take --config-dir compose through compose_train()."""
    bad = _bad_experiment(workdir / "myconf")
    with pytest.raises(MasksweepError) as error:
        compose_train([f"hydra.searchpath=['file://{bad.parents[1]}']", "+experiment=typo"])
    assert str(error.value).startswith("config error: myconf/experiment/typo.yaml line 4, column 16: ")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_smoke_says_its_ap_covers_a_subset_everywhere(make_cfg, workdir: Path, caplog) -> None:
    from masksweep.compare import build_rows, render_csv, results_table, subset_footnote
    from masksweep.tracking import open_client

    cfg = make_cfg("data.num_val=4", "eval.export_predictions=true", "checkpoint.dir=ckpt")
    with caplog.at_level(logging.INFO, logger="masksweep.train"):
        metrics = train(cfg)
    assert "AP over 2 of 4 val images (trainer.limit_val_batches=1)" in caplog.text  # the epoch line

    client, _ = open_client(None)
    run = client.get_run(metrics["run_id"])
    assert run.data.tags["eval.images_scored"] == "2 of 4"
    rows = build_rows([run])
    assert results_table(rows)[1][0][0].endswith("*") and "(2 of 4)" in subset_footnote(rows)
    assert "2 of 4" in render_csv(rows)

    # The export holds the 2 scored images only, and lists them.
    scored = json.loads((workdir / "ckpt" / "predictions.imgIds.json").read_text())
    detections = json.loads((workdir / "ckpt" / "predictions.json").read_text())
    assert len(scored) == 2 and detections and {d["image_id"] for d in detections} <= set(scored)


def _cocoeval_segm(ann_file: Path, results: Path, img_ids: list[int] | None) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(ann_file))
    evaluation = COCOeval(gt, gt.loadRes(str(results)), "segm")
    if img_ids is not None:
        evaluation.params.imgIds = img_ids
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0])


def test_the_readme_rescoring_recipe_gives_the_subset_ap(tmp_path: Path) -> None:
    """Perfect predictions for 2 of 4 annotated images: AP 1 over the scored images, as COCOeval says with
    the export's imgIds; over the whole annotation file the 2 unscored images' persons count as missed."""
    import torch

    from masksweep.metrics import COCOEvaluator, scored_ids_file

    coco = CocoFile(categories=[{"id": 1, "name": "person"}])
    person = rect_mask((SIZE, SIZE), (8, 40), (10, 30))
    for image_id in range(1, 5):
        coco.image(image_id, f"{image_id}.png", SIZE, SIZE)
        coco.annotation(image_id, compressed_rle(person), xywh(person))
    ann_file = coco.write(tmp_path / "ann.json")
    evaluator = COCOEvaluator("pycocotools", ground_truth=json.loads(ann_file.read_text()))
    mask = torch.from_numpy(person)[None]
    for image_id in (1, 3):
        target = {"image_id": image_id, "masks": mask, "labels": torch.ones(1, dtype=torch.int64)}
        output = {
            "masks": mask[:, None].float(),
            "scores": torch.ones(1),
            "labels": torch.ones(1, dtype=torch.int64),
            "boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0]]),
        }
        evaluator.process([target], [output])
    ap = evaluator.evaluate()["ap_segm"]
    results = evaluator.write_results(tmp_path / "predictions.json")
    scored = json.loads(scored_ids_file(results).read_text())
    assert scored == [1, 3] and ap == pytest.approx(1.0)
    assert _cocoeval_segm(ann_file, results, scored) == pytest.approx(ap, abs=1e-9)
    assert _cocoeval_segm(ann_file, results, None) < 0.6  # the mismatch, without the restriction


def _truncated_png(path: Path) -> Path:
    """A PNG whose header is intact (its size readable) but whose data stops halfway: a decode finds it."""
    noise = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    save_image(path, Image.fromarray(noise))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _coco_split(root: Path, name: str, count: int, truncated: int | None = None) -> Path:
    coco = CocoFile()
    for image_id in range(1, count + 1):
        file_name = f"{name}{image_id}.png"
        if image_id == truncated:
            _truncated_png(root / file_name)
        else:
            noise = np.random.default_rng(image_id).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            save_image(root / file_name, Image.fromarray(noise))
        coco.image(image_id, file_name, SIZE, SIZE)
        coco.annotation(image_id, rect_polygon((8, 40), (10, 30)), [10, 8, 20, 32])
    return coco.write(root / f"{name}.json")


def _coco_overrides(root: Path, train_truncated: int | None, val_truncated: int | None = None) -> list[str]:
    train_ann = _coco_split(root, "train", 8, train_truncated)
    val_ann = _coco_split(root, "val", 2, val_truncated)
    return [
        "trainer=smoke",
        "epochs=1",
        "data=coco",
        f"data.train.ann_file={train_ann}",
        f"data.train.image_root={root}",
        f"data.val.ann_file={val_ann}",
        f"data.val.image_root={root}",
        "model.min_size=64",
        "model.max_size=64",
        "++model.pretrain.enabled=false",
    ]


def _no_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built (or pretrained) before the data fault was found")

    monkeypatch.setattr(masksweep.train, "instantiate_model", must_not_run)
    monkeypatch.setattr(masksweep.model, "ensure_pretrained", must_not_run)


@pytest.mark.slow
def test_a_truncated_7th_train_image_is_dropped_by_name_and_the_run_finishes(
    make_cfg, workdir: Path, caplog
) -> None:
    from masksweep.tracking import open_client

    overrides = [*_coco_overrides(workdir / "images", train_truncated=7), "trainer.limit_train_batches=null"]
    with caplog.at_level(logging.WARNING, logger="masksweep.data"):
        metrics = train(make_cfg(*overrides, tiny=False))  # 4 steps of 2: every train image is read
    dropped = [r.getMessage() for r in caplog.records if "dropped a train image" in r.getMessage()]
    assert len(dropped) == 1 and "train7.png" in dropped[0], caplog.text
    client, _ = open_client(None)
    assert client.get_run(metrics["run_id"]).data.metrics["data/dropped_images"] == 1.0

    # Past data.max_bad_images the run stops, with one line naming the file.
    stop = r"data.max_bad_images=0: 1 train images could not be read.*train7\.png"
    with pytest.raises(DataError, match=stop):
        train(make_cfg(*overrides, "data.max_bad_images=0", "tracking=none", tiny=False))


def test_a_truncated_val_image_is_named_before_any_pretraining_or_model_build(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model_build(monkeypatch)
    overrides = _coco_overrides(workdir / "images", train_truncated=None, val_truncated=2)
    with pytest.raises(DataError, match=r"val2\.png cannot be decoded"):
        train(make_cfg(*overrides, "tracking=none", "++model.pretrain.enabled=true", tiny=False))


def test_a_mismatched_pennfudan_mask_is_named_before_the_model_is_built(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label_map = np.zeros((SIZE, SIZE), dtype=np.uint8)
    label_map[10:40, 20:30] = 1
    root = pennfudan_layout(workdir / "PennFudanPed", {f"FudanPed{i:05d}": label_map for i in range(1, 9)})
    bad_mask = root / "PedMasks" / "FudanPed00007_mask.png"
    save_image(bad_mask, Image.fromarray(label_map[:, :48]))
    _no_model_build(monkeypatch)
    cfg = make_cfg("trainer=smoke", "data=pennfudan", f"data.root={root}", "tracking=none", tiny=False)
    with pytest.raises(DataError, match=r"FudanPed00007_mask\.png: mask is 48x64 but its image is 64x64"):
        train(cfg)


def test_max_bad_images_is_checked(make_cfg) -> None:
    from masksweep.errors import ConfigError
    from masksweep.validation import validate

    with pytest.raises(ConfigError, match=r"data.max_bad_images=-1 is invalid; allowed: an integer >= 0"):
        validate(make_cfg("data.max_bad_images=-1"))


@pytest.mark.slow
def test_the_readme_install_check_never_pretrains(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    install_block = readme.split("## Installing", 1)[1].split("```bash", 2)[2]
    first = next(line for line in install_block.splitlines() if line.strip())
    assert first.split("#")[0].strip() == "masksweep check"  # the first command after installing

    fresh, cache = tmp_path / "fresh", tmp_path / "empty-cache"
    fresh.mkdir()
    env = {**os.environ, "MASKSWEEP_CACHE_DIR": str(cache)}
    command = [sys.executable, "-c", "from masksweep.cli import main; raise SystemExit(main(['check']))"]
    result = subprocess.run(command, cwd=fresh, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("masksweep check: OK in ")
    assert "Pretraining" not in result.stderr + result.stdout
    assert not cache.exists()  # nothing pretrained, nothing cached
    assert list(fresh.iterdir()) == []  # and nothing left in the working directory
