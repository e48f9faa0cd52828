"""COCOEvaluator: AP vs known answers and pycocotools, backend agreement, IoU definitions, results JSON."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from masksweep.errors import ConfigError
from masksweep.metrics import METRIC_KEYS, COCOEvaluator, _match_instances

BACKENDS = ["faster_coco_eval", "pycocotools"]
AP_KEYS = [k for k in METRIC_KEYS if k.startswith("ap_")]


def rect_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_target(image_id: int, masks: list[torch.Tensor], iscrowd: list[int] | None = None, hw=(32, 32)):
    n = len(masks)
    stack = torch.stack(masks) if n else torch.zeros(0, *hw, dtype=torch.uint8)
    boxes = []
    for m in stack:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "masks": stack,
        "labels": torch.ones(n, dtype=torch.int64),
        "iscrowd": torch.tensor(iscrowd or [0] * n, dtype=torch.int64),
        "area": stack.flatten(1).sum(1).to(torch.float32),
        "image_id": image_id,
    }


def make_output(masks: list[torch.Tensor], scores: list[float], boxes=None, hw=(32, 32)):
    n = len(masks)
    probs = torch.stack(masks).to(torch.float32) if n else torch.zeros(0, *hw)
    if boxes is None:
        boxes = make_target(0, masks, hw=hw)["boxes"] if n else torch.zeros(0, 4)
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(n, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "masks": probs[:, None],
    }


def random_split(n_images: int = 20, seed: int = 0, hw=(48, 48)):
    """Images with 0-4 rectangular people (some crowd); predictions jittered, with FPs and misses."""
    gen = np.random.default_rng(seed)
    h, w = hw
    targets, outputs = [], []
    for image_id in range(1, n_images + 1):
        gts, crowd = [], []
        for _ in range(gen.integers(0, 5)):
            x0, y0 = gen.integers(0, w - 8), gen.integers(0, h - 8)
            gts.append(rect_mask(h, w, x0, y0, gen.integers(x0 + 4, w), gen.integers(y0 + 4, h)))
            crowd.append(int(gen.random() < 0.1))
        targets.append(make_target(image_id, gts, crowd, hw=hw))
        preds, scores, boxes = [], [], []
        for m in gts:
            if gen.random() < 0.2:
                continue  # missed
            shifted = torch.roll(m, shifts=(int(gen.integers(-2, 3)), int(gen.integers(-2, 3))), dims=(0, 1))
            prob = shifted.float() * float(gen.uniform(0.55, 1.0))
            preds.append(prob)
            scores.append(float(gen.uniform(0.3, 1.0)))
            boxes.append(make_target(0, [shifted], hw=hw)["boxes"][0] + torch.tensor(gen.normal(0, 0.7, 4)))
        for _ in range(gen.integers(0, 3)):  # false positives
            x0, y0 = gen.integers(0, w - 8), gen.integers(0, h - 8)
            fp = rect_mask(h, w, x0, y0, x0 + 6, y0 + 7)
            preds.append(fp.float())
            scores.append(float(gen.uniform(0.05, 0.8)))
            boxes.append(torch.tensor([x0, y0, x0 + 6, y0 + 7], dtype=torch.float32))
        box_tensor = torch.stack(boxes).float() if boxes else torch.zeros(0, 4)
        outputs.append(make_output(preds, scores, box_tensor, hw=hw))
    return targets, outputs


def pycocotools_ap(gt: dict, results: list, iou_type: str, tmp_path) -> list[float]:
    gt_path, res_path = tmp_path / f"gt_{iou_type}.json", tmp_path / f"res_{iou_type}.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(res_path)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:3]]


def test_unknown_backend_is_config_error():
    with pytest.raises(ConfigError, match=r"eval\.backend"):
        COCOEvaluator(backend="detectron2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_score_one(backend):
    ev = COCOEvaluator(backend)
    for image_id in (1, 2, 3):
        masks = [rect_mask(32, 32, 2, 3, 12, 20), rect_mask(32, 32, 15, 10, 30, 31)][: image_id % 2 + 1]
        ev.process([make_target(image_id, masks)], [make_output(masks, [0.9] * len(masks))])
    metrics = ev.evaluate()
    assert set(metrics) == set(METRIC_KEYS)
    assert all(type(v) is float for v in metrics.values())
    assert all(v == pytest.approx(1.0) for v in metrics.values()), metrics
    assert ev.evaluate() == metrics  # the COCO APIs mutate annotations; state must survive evaluate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_score_zero(backend):
    ev = COCOEvaluator(backend)
    ev.process([make_target(1, [rect_mask(32, 32, 0, 0, 8, 8)])], [make_output([], [])])
    assert ev.evaluate() == dict.fromkeys(METRIC_KEYS, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_partial_overlap(backend):
    # GT 10x10; prediction keeps 68 of its 100 pixels and a box of IoU 0.68: matched at IoU thresholds
    # 0.50, 0.55, 0.60, 0.65 only -> AP = 4/10, AP50 = 1, AP75 = 0, for boxes and masks alike.
    gt = rect_mask(32, 32, 0, 0, 10, 10)
    pred = gt.clone()
    pred.view(-1)[torch.nonzero(gt.view(-1))[:32, 0]] = 0
    assert int(pred.sum()) == 68
    ev = COCOEvaluator(backend)
    ev.process([make_target(1, [gt])], [make_output([pred], [0.9], [[0, 0, 10, 6.8]])])
    m = ev.evaluate()
    for kind in ("bbox", "segm"):
        assert m[f"ap_{kind}"] == pytest.approx(0.4)
        assert m[f"ap_{kind}_50"] == pytest.approx(1.0)
        assert m[f"ap_{kind}_75"] == pytest.approx(0.0)
    assert m["iou_global"] == pytest.approx(0.68)
    assert m["iou_instance_mean"] == pytest.approx(0.68)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_partial_overlap_matches_pycocotools(backend, tmp_path):
    ev = COCOEvaluator(backend)
    targets, outputs = random_split(12, seed=1)
    ev.process(targets[:5], outputs[:5])
    ev.process(targets[5:], outputs[5:])
    m = ev.evaluate()
    res_path = ev.write_results(tmp_path / "res.json")
    results = json.loads(res_path.read_text())
    for kind in ("bbox", "segm"):
        expected = pycocotools_ap(ev.ground_truth(), results, kind, tmp_path)
        got = [m[f"ap_{kind}"], m[f"ap_{kind}_50"], m[f"ap_{kind}_75"]]
        assert 0.05 < got[0] < 0.95  # a genuinely partial case
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_on_crowd_region_is_not_false_positive(backend):
    person = rect_mask(32, 32, 0, 0, 10, 20)
    crowd = rect_mask(32, 32, 16, 0, 32, 32)
    on_crowd = rect_mask(32, 32, 18, 4, 30, 28)
    # The crowd detection scores higher than the true positive, so as a false positive it would cost AP.
    output = make_output([person, on_crowd], [0.8, 0.95])

    ev = COCOEvaluator(backend)
    ev.process([make_target(1, [person, crowd], iscrowd=[0, 1])], [output])
    m = ev.evaluate()
    assert m["ap_bbox"] == pytest.approx(1.0) and m["ap_segm"] == pytest.approx(1.0)
    assert m["iou_instance_mean"] == pytest.approx(1.0)  # crowd GT is no instance to recover

    control = COCOEvaluator(backend)  # same detection with no crowd annotation: now a false positive
    control.process([make_target(1, [person])], [output])
    assert control.evaluate()["ap_segm"] < 0.9


def test_backends_agree_on_random_split():
    targets, outputs = random_split(20, seed=7)
    results = {}
    for backend in BACKENDS:
        ev = COCOEvaluator(backend)
        ev.process(targets, outputs)
        results[backend] = ev.evaluate()
    fast, ref = results["faster_coco_eval"], results["pycocotools"]
    assert 0.05 < ref["ap_segm"] < 0.95 and 0.05 < ref["ap_bbox"] < 0.95
    for key in METRIC_KEYS:
        assert fast[key] == pytest.approx(ref[key], abs=1e-9), key


def test_iou_definitions_on_known_masks():
    h = w = 8
    ev = COCOEvaluator(score_threshold=0.5, mask_threshold=0.5)
    # Image 1: two GT halves of a 4x4 block (16 px); one prediction equal to the left half (8 px).
    left, right = rect_mask(h, w, 0, 0, 2, 4), rect_mask(h, w, 2, 0, 4, 4)
    pred = left.float() * 0.9
    pred[6:, 6:] = 0.5  # not > mask_threshold: ignored
    low_score = torch.ones(h, w)  # covers everything but is below score_threshold
    ev.process(
        [make_target(1, [left, right], hw=(h, w))],
        [make_output([pred, low_score], [0.8, 0.3], hw=(h, w))],
    )
    # Image 2: GT of 4 px, no prediction at all -> IoU 0.
    ev.process([make_target(2, [rect_mask(h, w, 5, 5, 7, 7)], hw=(h, w))], [make_output([], [], hw=(h, w))])
    # Image 3: nothing there and nothing predicted -> per-image IoU 1, adds nothing to the global sums.
    ev.process([make_target(3, [], hw=(h, w))], [make_output([], [], hw=(h, w))])
    m = ev.evaluate()
    assert m["iou_global"] == pytest.approx(8 / 20)  # (8 + 0 + 0) / (16 + 4 + 0)
    assert m["iou_image_mean"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["iou_instance_mean"] == pytest.approx(1 / 3)  # left 1.0, right 0, image-2 person 0


def test_instance_matching_is_optimal_not_greedy():
    iou = np.array([[0.6, 0.5], [0.55, 0.0]])
    # Greedy (best score takes its best GT) gets 0.6; the optimal one-to-one assignment gets 1.05.
    assert _match_instances(iou, np.array([0.9, 0.8])) == pytest.approx(1.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_splits_are_well_defined(backend):
    ev = COCOEvaluator(backend)
    assert ev.evaluate() == dict.fromkeys(METRIC_KEYS, 0.0)  # nothing processed

    ev.process([make_target(1, [])], [make_output([], [])])  # no persons, no detections
    m = ev.evaluate()
    assert [m[k] for k in AP_KEYS] == [0.0] * 6
    assert m["iou_global"] == 1.0 and m["iou_image_mean"] == 1.0 and m["iou_instance_mean"] == 0.0

    ev.reset()  # no persons, but detections: COCO AP is undefined (-1) -> 0.0, no crash
    ev.process([make_target(1, [])], [make_output([rect_mask(32, 32, 0, 0, 5, 5)], [0.9])])
    m = ev.evaluate()
    assert [m[k] for k in AP_KEYS] == [0.0] * 6
    assert m["iou_global"] == 0.0


def test_repeated_image_id_is_rejected_until_reset():
    ev = COCOEvaluator()
    batch = ([make_target(1, [])], [make_output([], [])])
    ev.process(*batch)
    with pytest.raises(ValueError, match="image_id 1"):
        ev.process(*batch)
    ev.reset()
    ev.process(*batch)
    assert len(ev.ground_truth()["images"]) == 1


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_write_results_round_trips_through_pycocotools(tmp_path):
    targets, outputs = random_split(5, seed=3)
    ev = COCOEvaluator()
    ev.process(targets, outputs)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(ev.ground_truth()))
    res_path = ev.write_results(tmp_path / "sub" / "res.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        dets = coco.loadRes(str(res_path))
    anns = [dets.anns[i] for i in sorted(dets.anns)]
    expected = [
        (t["image_id"], m[0] > 0.5, box, s)
        for t, o in zip(targets, outputs, strict=True)
        for m, box, s in zip(o["masks"], o["boxes"], o["scores"], strict=True)
    ]
    assert len(anns) == len(expected) > 0
    for ann, (image_id, mask, box, score) in zip(anns, expected, strict=True):
        assert ann["image_id"] == image_id and ann["category_id"] == 1
        assert isinstance(ann["segmentation"]["counts"], str)
        np.testing.assert_array_equal(dets.annToMask(ann), mask.numpy().astype(np.uint8))
        x0, y0, x1, y1 = box.tolist()
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-5)
        assert ann["score"] == pytest.approx(float(score))
    # The GT side decodes to the target masks as well.
    first = coco.loadAnns(coco.getAnnIds(imgIds=[targets[0]["image_id"]]))
    for ann, m in zip(first, targets[0]["masks"], strict=True):
        np.testing.assert_array_equal(coco.annToMask(ann), m.numpy())
