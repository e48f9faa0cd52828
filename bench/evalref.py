"""Evaluation helpers shared by figures 2 and 5: synthetic predictions, pycocotools AP, a reference-style
evaluation in the manner of torchvision's detection references."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
import torch

AP_KEYS = ("ap_bbox", "ap_bbox_50", "ap_bbox_75", "ap_segm", "ap_segm_50", "ap_segm_75")


def synthetic_outputs(target: dict[str, Any], seed: int, detections: int = 30) -> dict[str, torch.Tensor]:
    """Mask R-CNN-shaped outputs for one image: jittered copies of its ground truth (true and duplicate
    detections) plus random false positives, `detections` in all, masks as (K, 1, H, W) probabilities.

    AP cost depends on the counts and the mask shapes, not on where they came from; this gives a realistic,
    non-trivial AP (a random-init model scores ~0) without training a model first."""
    rng = np.random.default_rng(seed)
    gt = torch.as_tensor(target["masks"]).to(torch.bool)
    n, height, width = gt.shape
    masks: list[torch.Tensor] = []
    scores: list[float] = []
    for i in range(n):
        for copy_index in range(3 if i % 2 == 0 else 2):
            dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
            shifted = torch.roll(gt[i], shifts=(dy, dx), dims=(0, 1))
            masks.append(shifted)
            scores.append(float(rng.uniform(0.6, 1.0) if copy_index == 0 else rng.uniform(0.1, 0.7)))
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    while len(masks) < detections:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(3, height / 4), rng.uniform(3, width / 6)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
        scores.append(float(rng.uniform(0.05, 0.6)))
    masks = masks[:detections]
    scores = scores[:detections]
    binary = torch.stack(masks)
    keep = binary.flatten(1).any(1)
    binary = binary[keep]
    score = torch.tensor(scores, dtype=torch.float32)[keep]
    order = torch.argsort(score, descending=True)
    binary, score = binary[order], score[order]
    noise = torch.from_numpy(rng.uniform(0.0, 0.3, size=binary.shape).astype(np.float32))
    probs = torch.where(binary, 0.7 + noise, noise)  # > 0.5 exactly on the mask
    boxes = _boxes_of(binary)
    return {
        "boxes": boxes,
        "labels": torch.ones(len(score), dtype=torch.int64),
        "scores": score,
        "masks": probs[:, None],
    }


def _boxes_of(binary: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import masks_to_boxes

    if binary.shape[0] == 0:
        return torch.zeros((0, 4))
    boxes = masks_to_boxes(binary)
    boxes[:, 2:] += 1
    return boxes


def pycocotools_ap(gt_dict: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """bbox and segm AP with pycocotools' reference COCOeval, on copies of the given dicts (as the evaluator
    does: segm results without their bbox, so the mask area is used)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    for iou_type in ("bbox", "segm"):
        dets = copy.deepcopy(results)
        if iou_type == "segm":
            for det in dets:
                det.pop("bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = copy.deepcopy(gt_dict)
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for key, value in zip(("", "_50", "_75"), evaluator.stats[:3], strict=True):
            metrics[f"ap_{iou_type}{key}"] = max(float(value), 0.0)
    return metrics


# ---------------------------------------------------------------------------------- reference-style evaluate
def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin, ymin, xmax - xmin, ymax - ymin), dim=1).tolist()


@torch.inference_mode()
def reference_evaluate(model: torch.nn.Module, loader, device: torch.device) -> dict[str, float]:
    """torchvision-references style: the model's full pasted masks, then `reference_scores`."""
    model.eval()
    targets, outputs = [], []
    for images, batch_targets in loader:
        batch = model([image.as_subclass(torch.Tensor).to(device) for image in images])
        outputs += [{k: v.to("cpu") for k, v in output.items()} for output in batch]
        targets += batch_targets
    return reference_scores(targets, outputs)


def reference_scores(targets: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, float]:
    """What the references do after inference: masks thresholded and RLE-encoded one at a time with
    pycocotools (predictions, and the ground truth in convert_to_coco_api), then pycocotools COCOeval for
    bbox and segm (no IoU metrics)."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images_info, gt_anns, results = [], [], []
    for target, output in zip(targets, outputs, strict=True):
        image_id = int(target["image_id"])
        masks = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor)
        height, width = masks.shape[-2:]
        images_info.append({"id": image_id, "height": int(height), "width": int(width)})
        # convert_to_coco_api: one encode per ground-truth instance
        masks = masks.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        for i, box in enumerate(_xywh(torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor))):
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": image_id,
                    "bbox": box,
                    "category_id": int(target["labels"][i]),
                    "area": float(target["area"][i]),
                    "iscrowd": int(target["iscrowd"][i]),
                    "segmentation": mask_util.encode(masks[i].numpy()),
                }
            )
        # prepare_for_coco_segmentation: one encode per predicted mask
        binary = output["masks"] > 0.5
        scores = output["scores"].tolist()
        labels = output["labels"].tolist()
        rles = [
            mask_util.encode(np.array(mask[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0]
            for mask in binary
        ]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")
        for k, box in enumerate(_xywh(output["boxes"])):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": labels[k],
                    "bbox": box,
                    "score": scores[k],
                    "segmentation": rles[k],
                }
            )
    metrics = dict.fromkeys(AP_KEYS, 0.0)
    if not results:
        return metrics
    gt_dict = {
        "images": images_info,
        "annotations": gt_anns,
        "categories": [{"id": 1, "name": "person"}],
    }
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_dict
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for key, value in zip(("", "_50", "_75"), evaluator.stats[:3], strict=True):
            metrics[f"ap_{iou_type}{key}"] = max(float(value), 0.0)
    return metrics


@torch.inference_mode()
def inference_only(model: torch.nn.Module, loader, device: torch.device) -> int:
    """The model part of an evaluation alone (what both evaluations share)."""
    from masksweep.engine import predict

    count = 0
    for images, _ in loader:
        count += len(predict(model, images, device))
    return count
