"""instance_map ordering/threshold/overlap/dtype; overlay and colorize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masksweep.postprocess import colorize, instance_map, overlay, palette


def prediction(masks: list[np.ndarray], scores: list[float]) -> dict:
    h, w = masks[0].shape if masks else (6, 6)
    stacked = torch.tensor(np.stack(masks), dtype=torch.float32) if masks else torch.zeros(0, h, w)
    return {"masks": stacked[:, None], "scores": torch.tensor(scores, dtype=torch.float32)}


def block(h: int, w: int, y0: int, y1: int, x0: int, x1: int, value: float = 0.9) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.float32)
    m[y0:y1, x0:x1] = value
    return m


def test_ids_follow_descending_score_for_unsorted_input():
    masks = [block(4, 6, 0, 4, 0, 2), block(4, 6, 0, 4, 2, 4), block(4, 6, 0, 4, 4, 6)]
    ids = instance_map(prediction(masks, [0.6, 0.9, 0.7]))
    assert ids.dtype == np.uint8 and ids.shape == (4, 6)
    assert (ids[:, 0:2] == 3).all() and (ids[:, 2:4] == 1).all() and (ids[:, 4:6] == 2).all()


def test_score_and_mask_thresholds():
    masks = [block(4, 4, 0, 2, 0, 4, 0.51), block(4, 4, 2, 4, 0, 4, 0.5), block(4, 4, 0, 4, 0, 4)]
    ids = instance_map(prediction(masks, [0.8, 0.7, 0.4]))  # third below the score threshold
    assert (ids[:2] == 1).all()
    assert (ids[2:] == 0).all()  # probability 0.5 is not > 0.5
    loose = instance_map(prediction(masks, [0.8, 0.7, 0.4]), score_threshold=0.3, mask_threshold=0.4)
    assert (loose[:2] == 1).all() and (loose[2:] == 2).all()


@pytest.mark.parametrize("scores", [[0.9, 0.6], [0.6, 0.9]])
def test_overlap_goes_to_higher_score(scores):
    a, b = block(4, 4, 0, 4, 0, 3), block(4, 4, 0, 4, 1, 4)
    ids = instance_map(prediction([a, b], scores))
    a_wins = scores[0] > scores[1]
    assert (ids[:, 1:3] == 1).all()  # overlap belongs to id 1, the best score
    assert (ids[:, 0] == (1 if a_wins else 2)).all()
    assert (ids[:, 3] == (2 if a_wins else 1)).all()


def test_many_instances_use_uint16():
    h = w = 20
    n = 300
    masks = np.zeros((n, h, w), dtype=np.float32)
    masks[np.arange(n), np.arange(n) // w, np.arange(n) % w] = 1.0
    scores = np.linspace(0.6, 0.99, n)  # ascending: pixel i should get id n - i
    ids = instance_map({"masks": torch.from_numpy(masks[:, None]), "scores": torch.from_numpy(scores)})
    assert ids.dtype == np.uint16
    flat = ids.reshape(-1)
    np.testing.assert_array_equal(flat[:n], n - np.arange(n))
    assert (flat[n:] == 0).all()
    assert instance_map({"masks": masks[:255, None], "scores": scores[:255]}).dtype == np.uint8


def test_empty_prediction_is_all_background():
    ids = instance_map({"masks": torch.zeros(0, 1, 5, 7), "scores": torch.zeros(0)})
    assert ids.shape == (5, 7) and ids.dtype == np.uint8 and not ids.any()


def test_palette_is_deterministic_and_distinct():
    colours = palette(64)
    assert colours.dtype == np.uint8 and colours.shape == (65, 3)
    assert (colours[0] == 0).all()
    assert len({tuple(c) for c in colours}) == 65
    np.testing.assert_array_equal(palette(64), colours)
    np.testing.assert_array_equal(palette(10), colours[:11])  # an id's colour does not depend on N


def test_overlay_darkens_background_and_tints_instances():
    ids = np.zeros((4, 5), dtype=np.uint8)
    ids[1:3, 1:3] = 1
    ids[3, 4] = 2
    image = torch.full((3, 4, 5), 0.5)
    out = overlay(image, ids, alpha=0.5, background_dim=0.4)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out[0, 0] == round(127.5 * 0.4)).all()
    colours = palette(2).astype(float)
    np.testing.assert_array_equal(out[1, 1], np.round(0.5 * 127.5 + 0.5 * colours[1]))
    np.testing.assert_array_equal(out[3, 4], np.round(0.5 * 127.5 + 0.5 * colours[2]))
    assert not np.array_equal(out[1, 1], out[3, 4])
    # A uint8 HWC image gives the same picture as the equivalent float CHW tensor.
    hwc = np.full((4, 5, 3), 128, dtype=np.uint8)
    assert np.abs(overlay(hwc, ids).astype(int) - out.astype(int)).max() <= 1


def test_overlay_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8))


def test_colorize_uses_palette():
    ids = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    rgb = colorize(ids)
    colours = palette(2)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 0).all()
    np.testing.assert_array_equal(rgb[1, 1], colours[2])
    np.testing.assert_array_equal(rgb[0, 1], colours[1])
