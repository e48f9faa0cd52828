"""COCO loader on small annotation files written by the tests."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_factories import (
    CocoFile,
    coco_cfg,
    compressed_rle,
    corrupt_png,
    exif_rotated_png,
    rect_mask,
    rect_polygon,
    save_image,
    solid_rgb,
    train_val,
    uncompressed_rle,
    xywh,
)
from masksweep.data import build_datasets
from masksweep.errors import DataError

SIZE = 16  # image side; items keep it (the model resizes), so masks compare exactly

POLYGON = ((1, 4), (1, 5))
UNCOMPRESSED = ((6, 9), (2, 8))
COMPRESSED = ((10, 15), (9, 12))
CROWD = ((12, 16), (0, 6))


def _mask(rows_cols: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    return rect_mask((SIZE, SIZE), *rows_cols)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """Image 5: one person per segmentation format, a crowd region and a dog; image 42: a grayscale image in
    a subdirectory with one person; image 1001: only a dog. Ids are not contiguous; person is category 23."""
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(SIZE, SIZE))
    save_image(root / "sub" / "b.png", Image.new("L", (SIZE, SIZE), 77))
    save_image(root / "c.png", solid_rgb(SIZE, SIZE))
    coco = (
        CocoFile()
        .image(5, "a.png", SIZE, SIZE)
        .image(42, "sub/b.png", SIZE, SIZE)
        .image(1001, "c.png", SIZE, SIZE)
        .annotation(5, rect_polygon(*POLYGON), xywh(_mask(POLYGON)))
        .annotation(5, uncompressed_rle(_mask(UNCOMPRESSED)), xywh(_mask(UNCOMPRESSED)))
        .annotation(5, compressed_rle(_mask(COMPRESSED)), xywh(_mask(COMPRESSED)))
        .annotation(5, uncompressed_rle(_mask(CROWD)), xywh(_mask(CROWD)), iscrowd=1)
        .annotation(5, rect_polygon((0, 16), (14, 16)), [14, 0, 2, 16], category="dog")
        .annotation(42, rect_polygon(*POLYGON), xywh(_mask(POLYGON)))
        .annotation(1001, rect_polygon(*POLYGON), xywh(_mask(POLYGON)), category="dog")
    )
    return coco.write(tmp_path / "ann.json"), root


def _by_id(dataset) -> dict[int, tuple]:
    return {
        target["image_id"]: (image, target) for image, target in (dataset[i] for i in range(len(dataset)))
    }


def test_every_segmentation_format_decodes_to_its_mask(coco: tuple[Path, Path]) -> None:
    _, val = train_val(coco_cfg(*coco))
    _, target = _by_id(val)[5]
    expected = [_mask(POLYGON), _mask(UNCOMPRESSED), _mask(COMPRESSED), _mask(CROWD)]
    assert torch.equal(target["masks"], torch.from_numpy(np.stack(expected)))
    assert target["area"].tolist() == [float(m.sum()) for m in expected]
    for box, mask in zip(target["boxes"].tolist(), expected, strict=True):
        rows, cols = np.nonzero(mask)
        assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_crowd_regions_are_left_out_of_training_and_kept_for_evaluation(coco: tuple[Path, Path]) -> None:
    train, val = train_val(coco_cfg(*coco))
    assert _by_id(train)[5][1]["iscrowd"].tolist() == [0, 0, 0]
    assert _by_id(val)[5][1]["iscrowd"].tolist() == [0, 0, 0, 1]


def test_person_is_found_by_name_and_image_ids_are_kept(coco: tuple[Path, Path]) -> None:
    train, _ = train_val(coco_cfg(*coco))
    samples = _by_id(train)
    assert sorted(samples) == [5, 42]  # image 1001 has only a dog
    for image, target in samples.values():
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [1] * len(target["labels"])
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert image.min() >= 0.0 and image.max() <= 1.0


def test_the_dropped_images_are_logged_with_their_reason(coco: tuple[Path, Path], caplog) -> None:
    with caplog.at_level(logging.INFO, logger="masksweep.data"):
        build_datasets(coco_cfg(*coco))
    lines = [r.getMessage() for r in caplog.records]
    assert "data=coco: train split: 2 images loaded, dropped 1 (no person)" in lines
    assert "data=coco: val split: 2 images loaded, dropped 1 (no person)" in lines


def test_keep_empty_keeps_images_without_persons(coco: tuple[Path, Path]) -> None:
    train, val = train_val(coco_cfg(*coco, keep_empty=True))
    _, target = _by_id(train)[1001]
    assert target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, SIZE, SIZE)
    assert sorted(_by_id(val)) == [5, 42, 1001]


def test_grayscale_rgba_palette_and_exif_images_become_upright_rgb(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "gray.png", Image.new("L", (SIZE, SIZE), 77))
    save_image(root / "rgba.png", Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0)))
    palette = Image.new("P", (SIZE, SIZE), 3)
    palette.putpalette([0, 0, 0] * 3 + [40, 50, 60])
    save_image(root / "palette.png", palette)
    exif_rotated_png(root / "exif.png")
    coco = CocoFile()
    for image_id, name in enumerate(["gray.png", "rgba.png", "palette.png"], start=1):
        coco.image(image_id, name, SIZE, SIZE).annotation(
            image_id, rect_polygon(*POLYGON), xywh(_mask(POLYGON))
        )
    # EXIF says rotate: the annotation describes the upright 8 x 16 image.
    upright = rect_mask((16, 8), (0, 8), (0, 8))  # the red half
    coco.image(4, "exif.png", 8, 16).annotation(4, compressed_rle(upright), xywh(upright))
    cfg = coco_cfg(coco.write(tmp_path / "ann.json"), root)

    samples = _by_id(train_val(cfg)[1])
    colours = {image_id: (samples[image_id][0][:, 0, 0] * 255).round().tolist() for image_id in (1, 2, 3)}
    assert colours == {1: [77, 77, 77], 2: [10, 20, 30], 3: [40, 50, 60]}
    image, target = samples[4]
    assert image.shape == (3, 16, 8)  # upright, at its own size
    assert (image[0, :7] > 0.9).all() and (image[2, :7] < 0.1).all()  # red on top, as a viewer shows it
    assert (image[2, 9:] > 0.9).all() and (image[0, 9:] < 0.1).all()
    assert target["masks"][0, :8].all() and not target["masks"][0, 8:].any()


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_file_name_escaping_the_image_root_is_rejected(tmp_path: Path, file_name: str) -> None:
    root = tmp_path / "images"
    root.mkdir()
    save_image(tmp_path / "outside.png", solid_rgb(SIZE, SIZE))
    coco = CocoFile().image(1, file_name, SIZE, SIZE).annotation(1, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match="escapes the image root") as error:
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root))
    assert file_name in str(error.value)


def test_annotated_image_missing_on_disk_fails_at_build(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    coco = CocoFile().image(3, "gone.png", SIZE, SIZE).annotation(3, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match=r"gone\.png.*does not exist"):
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root))


def test_annotation_for_an_unlisted_image_id_fails_at_build(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(SIZE, SIZE))
    coco = CocoFile().image(1, "a.png", SIZE, SIZE).annotation(77, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match="image_id 77"):
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root))


@pytest.mark.parametrize("key", ["ann_file", "image_root"])
def test_missing_data_path_fails_at_build(tmp_path: Path, key: str) -> None:
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(SIZE, SIZE))
    ann_file = CocoFile().image(1, "a.png", SIZE, SIZE).write(tmp_path / "ann.json")
    cfg = coco_cfg(ann_file, root)
    cfg.train[key] = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"data\.train\.{key}=.*nowhere.*does not exist"):
        build_datasets(cfg)


def test_a_corrupt_header_past_the_first_image_fails_at_build_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(SIZE, SIZE))
    corrupt_png(root / "broken.png")
    coco = CocoFile()
    for image_id, name in ((1, "a.png"), (2, "broken.png")):
        coco.image(image_id, name, SIZE, SIZE).annotation(image_id, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match=r"broken\.png.*cannot be decoded") as error:
        train_val(coco_cfg(coco.write(tmp_path / "ann.json"), root))  # every image's header is read
    assert "\n" not in str(error.value)


def test_a_bad_first_image_fails_at_build(tmp_path: Path) -> None:
    root = tmp_path / "images"
    corrupt_png(root / "broken.png")
    coco = CocoFile().image(1, "broken.png", SIZE, SIZE).annotation(1, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match=r"broken\.png.*cannot be decoded"):
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root))


def test_verify_decodes_every_image_at_build(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(SIZE, SIZE))
    corrupt_png(root / "broken.png")
    coco = CocoFile()
    for image_id, name in ((1, "a.png"), (2, "broken.png")):
        coco.image(image_id, name, SIZE, SIZE).annotation(image_id, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match=r"broken\.png"):
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root, verify=True))


def test_image_whose_size_differs_from_its_annotation_fails(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a.png", solid_rgb(12, SIZE))
    coco = CocoFile().image(1, "a.png", SIZE, SIZE).annotation(1, rect_polygon(*POLYGON), [1, 1, 4, 3])
    with pytest.raises(DataError, match=r"a\.png: image is 12x16 but .* annotates it as 16x16"):
        build_datasets(coco_cfg(coco.write(tmp_path / "ann.json"), root))
