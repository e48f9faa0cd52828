"""Detectron2-style evaluator: COCO box/mask AP plus foreground and instance IoUs.

AP is computed by a COCO API (faster-coco-eval's C++ ``COCOeval_faster`` by default, pycocotools' reference
``COCOeval`` on request); this module only assembles the COCO ground-truth dict and the results list. The
ground truth is the dataset's own (for COCO data: the annotation file's annotations, verbatim) when one is
given, so that AP equals what pycocotools computes from the source file and the exported results; without
one it is built from the targets as they are processed.
The IoUs are not provided by either library and are computed here (`_ImageIoU`, `_match_instances`).

Undefined values map to 0.0 rather than COCO's -1 (no ground-truth persons, no detections, nothing
processed), so every metric is a plain float that trackers and the Optuna objective can compare.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util

from masksweep.errors import ConfigError

BACKENDS = ("faster_coco_eval", "pycocotools")
PERSON = 1
METRIC_KEYS = (
    "ap_bbox",
    "ap_bbox_50",
    "ap_bbox_75",
    "ap_segm",
    "ap_segm_50",
    "ap_segm_75",
    "iou_global",
    "iou_image_mean",
    "iou_instance_mean",
)


@functools.cache
def _hungarian() -> Callable[..., Any] | None:
    """scipy's linear_sum_assignment, or None without scipy (then the greedy rule applies).

    Imported on first use, not with this module: scipy.optimize costs ~0.3 s, and every `masksweep-train`
    (even `--help`) imports this module through masksweep.engine."""
    try:  # Optimal one-to-one matching; scipy comes with scikit-learn, but degrade to greedy without it.
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is present in the supported environments
        return None
    return linear_sum_assignment


def _encode(binary: torch.Tensor) -> list[dict[str, Any]]:
    """RLE-encode (N, H, W) binary masks with one C call; counts become str so the dicts are JSON-ready."""
    if binary.shape[0] == 0:
        return []
    # The COCO mask API wants a Fortran-ordered (H, W, N) uint8 array; permuting a C-ordered (N, H, W)
    # view and asking for Fortran order makes exactly one copy with the right strides. A bool tensor is
    # reinterpreted as uint8 in place (same bytes) rather than converted, which would be a second copy.
    as_bytes = binary.view(torch.uint8) if binary.dtype == torch.bool else binary.to(torch.uint8)
    array = np.asfortranarray(as_bytes.permute(1, 2, 0).numpy())
    rles = mask_util.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.reshape(-1, 4).to(torch.float64)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def coco_results(
    image_id: int, output: dict[str, Any], binary_masks: torch.Tensor, category_id: int = PERSON
) -> list[dict[str, Any]]:
    """One image's person detections in COCO results format (xywh boxes, RLE masks, in the output's frame),
    under the dataset's person `category_id`, for COCO tools to re-score."""
    person = torch.as_tensor(output["labels"]).reshape(-1) == PERSON
    return [
        {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score, "segmentation": rle}
        for rle, box, score in zip(
            _encode(binary_masks[person]),
            _xyxy_to_xywh(torch.as_tensor(output["boxes"])[person]),
            torch.as_tensor(output["scores"]).reshape(-1)[person].to(torch.float32).tolist(),
            strict=True,
        )
    ]


def _match_instances(iou: np.ndarray, scores: np.ndarray) -> float:
    """Sum of IoUs of a one-to-one prediction (rows) to ground-truth (columns) matching.

    Hungarian assignment maximising total IoU when scipy is available; otherwise predictions in descending
    score order each take their best still-free ground truth (the COCO-style greedy rule).
    """
    if iou.size == 0:
        return 0.0
    hungarian = _hungarian()
    if hungarian is not None:
        rows, cols = hungarian(iou, maximize=True)
        return float(iou[rows, cols].sum())
    free = np.ones(iou.shape[1], dtype=bool)  # pragma: no cover - exercised only without scipy
    total = 0.0
    for row in np.argsort(-scores, kind="stable"):
        candidates = np.where(free, iou[row], -1.0)
        col = int(candidates.argmax())
        if candidates[col] > 0:
            free[col] = False
            total += float(candidates[col])
    return total


@dataclass
class _IoUTotals:
    """Running sums for the IoU metrics over a split."""

    intersection: int = 0  # Σ|P∩G| over images (foreground pixels)
    union: int = 0  # Σ|P∪G|
    image_iou_sum: float = 0.0
    images: int = 0
    instance_iou_sum: float = 0.0  # Σ matched IoU over ground-truth instances
    instances: int = 0  # non-crowd ground-truth instances


class COCOEvaluator:
    """Accumulates targets/outputs of a split, then reports COCO AP and IoUs.

    Metrics returned by `evaluate` (all plain floats):

    - ``ap_bbox``, ``ap_bbox_50``, ``ap_bbox_75``, ``ap_segm``, ``ap_segm_50``, ``ap_segm_75``: COCO AP
      (IoU 0.50:0.95, 0.50, 0.75; area "all", 100 detections) over every detection, whatever its score.
      Crowd ground truth is handled by COCO's rules (matches to it are ignored, not false positives).
      COCO's -1 for "undefined" (no ground-truth person in the split) and an empty detection list map to 0.0.
    - IoUs use only detections with ``score >= score_threshold`` binarised at ``mask > mask_threshold`` and
      only non-crowd ground truth (crowd regions are treated as background):

      * ``iou_global`` = Σ|P∩G| / Σ|P∪G| over the split, P and G the per-image foreground (union of predicted
        / ground-truth instance masks). 1.0 if no image has any foreground at all.
      * ``iou_image_mean`` = mean over images of |P∩G| / |P∪G|; an image with empty P and empty G counts 1.0.
      * ``iou_instance_mean`` = predictions matched one-to-one to ground-truth instances by mask IoU
        (Hungarian, maximising total IoU), then the mean IoU over ground-truth instances with unmatched
        ones counting 0; extra predictions are not penalised here (AP does that). 0.0 without ground truth.

      With no image processed, every metric is 0.0.

    ``ground_truth`` (a COCO dataset dict with one category, the person category, e.g. from
    `masksweep.data.ground_truth`) is what AP is computed against, restricted to the processed images;
    detections carry its category id. Without it, the ground truth is built from the processed targets
    (category id 1).
    """

    def __init__(
        self,
        backend: str = "faster_coco_eval",
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        ground_truth: dict[str, Any] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError("eval.backend", backend, ", ".join(BACKENDS))
        self.backend = backend
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self._source = _SourceTruth(ground_truth) if ground_truth is not None else None
        self.category_id = self._source.category["id"] if self._source is not None else PERSON
        self.reset()

    def reset(self) -> None:
        self._images: list[dict[str, Any]] = []
        self._gt_annotations: list[dict[str, Any]] = []
        self._detections: list[dict[str, Any]] = []
        self._seen: set[int] = set()
        self._iou = _IoUTotals()

    # ------------------------------------------------------------------ accumulation
    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Add one batch: ground-truth targets and the model's outputs for the same images, in order."""
        if len(targets) != len(outputs):
            raise ValueError(f"process: {len(targets)} targets but {len(outputs)} outputs")
        for target, output in zip(targets, outputs, strict=True):
            self._process_one(target, output)

    def _process_one(self, target: dict[str, Any], output: dict[str, Any]) -> None:
        image_id = int(target["image_id"])
        if image_id in self._seen:  # COCO keys everything by image id; a repeat would corrupt the GT
            raise ValueError(f"image_id {image_id} processed twice; call reset() between evaluations")
        gt_masks = torch.as_tensor(target["masks"]).to(torch.bool)
        height, width = gt_masks.shape[-2:]
        pred_masks = torch.as_tensor(output["masks"])
        pred_masks = pred_masks.reshape(pred_masks.shape[0], *pred_masks.shape[-2:])
        if pred_masks.shape[-2:] != gt_masks.shape[-2:]:  # check before any state changes
            raise ValueError(
                f"image {image_id}: output masks {tuple(pred_masks.shape[-2:])} vs target {(height, width)}"
            )
        if self._source is not None:
            self._source.check(image_id, int(height), int(width))
        self._seen.add(image_id)
        self._images.append({"id": image_id, "height": int(height), "width": int(width)})
        gt_labels = torch.as_tensor(target["labels"]).reshape(-1)
        iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros_like(gt_labels))).reshape(-1)
        if self._source is None:
            self._add_ground_truth(image_id, target, gt_masks, gt_labels, iscrowd)

        scores = torch.as_tensor(output["scores"]).reshape(-1).to(torch.float32)
        labels = torch.as_tensor(output["labels"]).reshape(-1)
        binary = pred_masks > self.mask_threshold  # threshold in torch, before any numpy copy
        self._detections.extend(coco_results(image_id, output, binary, self.category_id))

        keep_gt = (gt_labels == PERSON) & (iscrowd == 0)
        keep_dt = (labels == PERSON) & (scores >= self.score_threshold)
        self._accumulate_iou(binary[keep_dt], gt_masks[keep_gt], scores[keep_dt])

    def _add_ground_truth(
        self,
        image_id: int,
        target: dict[str, Any],
        gt_masks: torch.Tensor,
        gt_labels: torch.Tensor,
        iscrowd: torch.Tensor,
    ) -> None:
        """Ground truth from a target, for datasets without their own COCO ground truth."""
        area = target.get("area")
        area = (gt_masks.flatten(1).sum(1) if area is None else torch.as_tensor(area)).reshape(-1)
        gt_boxes = _xyxy_to_xywh(torch.as_tensor(target["boxes"]))
        for rle, box, label, crowd, a in zip(
            _encode(gt_masks), gt_boxes, gt_labels.tolist(), iscrowd.tolist(), area.tolist(), strict=True
        ):
            self._gt_annotations.append(
                {
                    "id": len(self._gt_annotations) + 1,  # COCOeval treats id 0 as "unmatched": start at 1
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "bbox": box,
                    "area": float(a),
                    "iscrowd": int(crowd),
                }
            )

    def _accumulate_iou(self, pred: torch.Tensor, gt: torch.Tensor, scores: torch.Tensor) -> None:
        """Foreground and instance IoU terms of one image (hand-written: no library computes these)."""
        totals = self._iou
        fg_pred, fg_gt = pred.any(0), gt.any(0)  # any() over zero instances is an all-False (H, W) map
        inter = int((fg_pred & fg_gt).sum())
        union = int((fg_pred | fg_gt).sum())
        totals.intersection += inter
        totals.union += union
        totals.image_iou_sum += inter / union if union else 1.0
        totals.images += 1

        totals.instances += gt.shape[0]
        if gt.shape[0] and pred.shape[0]:
            # Pairwise mask IoU as a matrix product of flattened masks: no per-pixel Python loops.
            p = pred.flatten(1).to(torch.float32)
            g = gt.flatten(1).to(torch.float32)
            inter_m = p @ g.T
            union_m = p.sum(1, keepdim=True) + g.sum(1) - inter_m
            iou = torch.where(union_m > 0, inter_m / union_m.clamp(min=1), torch.zeros_like(inter_m))
            totals.instance_iou_sum += _match_instances(iou.numpy(), scores.numpy())

    # ------------------------------------------------------------------ merging (one split over processes)
    def state(self) -> dict[str, Any]:
        """What `process` accumulated, as plain picklable data (RLE masks, not pixels), for `merge` in
        another process: a DDP trial's ranks each score a shard of the split."""
        return {
            "images": self._images,
            "gt_annotations": self._gt_annotations,
            "detections": self._detections,
            "iou": asdict(self._iou),
        }

    def merge(self, state: dict[str, Any]) -> None:
        """Add the images another evaluator processed (its `state()`), as if this one had processed them:
        COCO scores per image, so the metrics equal one evaluator's over the whole split."""
        repeated = self._seen & {image["id"] for image in state["images"]}
        if repeated:
            raise ValueError(f"image_id {min(repeated)} processed twice; the merged shards overlap")
        self._seen.update(image["id"] for image in state["images"])
        self._images.extend(state["images"])
        for ann in state["gt_annotations"]:  # ids are positions (COCOeval's 0 means unmatched): renumber
            self._gt_annotations.append({**ann, "id": len(self._gt_annotations) + 1})
        self._detections.extend(state["detections"])
        for name, value in state["iou"].items():
            setattr(self._iou, name, getattr(self._iou, name) + value)

    # ------------------------------------------------------------------ results
    def ground_truth(self) -> dict[str, Any]:
        """The COCO ground-truth dict of the images processed so far (a copy; safe to mutate or dump)."""
        if self._source is not None:
            return self._source.restricted(self._seen)
        return {
            "images": [dict(image) for image in self._images],
            "annotations": [_copy_annotation(ann) for ann in self._gt_annotations],
            "categories": [{"id": PERSON, "name": "person", "supercategory": "person"}],
        }

    def results(self) -> list[dict[str, Any]]:
        """The accumulated detections in COCO results format (a copy)."""
        return [_copy_annotation(det) for det in self._detections]

    @property
    def image_ids(self) -> list[int]:
        """The ids of the images scored since the last reset(), sorted: what AP and the export cover (a
        subset of the split when the evaluation was cut short, e.g. by trainer.limit_val_batches)."""
        return sorted(self._seen)

    def write_results(self, path: str | Path) -> Path:
        """Write the detections as a COCO results JSON (loadable by ``COCO.loadRes``) and, beside it, the ids
        of the images they were scored on (`scored_ids_file(path)`): COCOeval over the split's annotation file
        gives the same AP only with ``params.imgIds`` set to those, since an image left out of the
        evaluation would count its persons as missed. Returns the results path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._detections))
        scored_ids_file(path).write_text(json.dumps(self.image_ids))
        return path

    def evaluate(self) -> dict[str, float]:
        metrics = dict.fromkeys(METRIC_KEYS, 0.0)
        if not self._images:
            return metrics
        # COCO's loadRes indexes anns[0] and crashes on an empty list; no detections means AP 0 anyway.
        if self._detections:
            for iou_type in ("bbox", "segm"):
                ap, ap50, ap75 = self._coco_ap(iou_type)
                metrics[f"ap_{iou_type}"] = ap
                metrics[f"ap_{iou_type}_50"] = ap50
                metrics[f"ap_{iou_type}_75"] = ap75
        t = self._iou
        metrics["iou_global"] = t.intersection / t.union if t.union else 1.0
        metrics["iou_image_mean"] = t.image_iou_sum / t.images
        metrics["iou_instance_mean"] = t.instance_iou_sum / t.instances if t.instances else 0.0
        return {key: float(value) for key, value in metrics.items()}

    def _coco_ap(self, iou_type: str) -> tuple[float, float, float]:
        quiet = contextlib.redirect_stdout(io.StringIO())  # both APIs print their summaries
        with quiet:
            if self.backend == "faster_coco_eval":
                from faster_coco_eval import COCO, COCOeval_faster

                def silent(*args: object, **kwargs: object) -> None:
                    return None

                gt = COCO(print_function=silent)
                gt.dataset = self.ground_truth()
                gt.createIndex()
                dt = COCO(print_function=silent)
                dt.dataset = self._results_dataset(gt.dataset, iou_type)
                dt.createIndex()
                evaluator = COCOeval_faster(gt, dt, iou_type, print_function=silent)
            else:
                results = self.results()
                if iou_type == "segm":
                    # As detectron2 does: with a "bbox" present loadRes takes the box area as the detection's
                    # area, which would change the small/medium/large split of mask AP. Without it loadRes
                    # uses the mask area.
                    for det in results:
                        det.pop("bbox")
                from pycocotools.coco import COCO as PyCOCO
                from pycocotools.cocoeval import COCOeval

                gt = PyCOCO()  # its constructor only accepts a path; fill the dict directly instead
                gt.dataset = self.ground_truth()
                gt.createIndex()
                evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # stats[0:3] = AP@[.5:.95], AP@.5, AP@.75 in both implementations; -1 means undefined.
        return tuple(max(float(v), 0.0) for v in evaluator.stats[:3])  # type: ignore[return-value]

    def _results_dataset(self, gt_dataset: dict[str, Any], iou_type: str) -> dict[str, Any]:
        """The detections as the dataset that faster-coco-eval's ``loadRes`` would build, built directly.

        Same fields and values as ``gt.loadRes(self.results())`` (with ``bbox`` dropped for segm, as
        detectron2 does, so the mask area is used), but faster: loadRes calls the mask API once per detection
        for the area (and the box, for segm) and needs a defensive deep copy of every detection because it
        writes into them; here the areas and boxes come from one batched call each and only the top-level
        dicts are new (the COCO APIs add keys there; the nested RLE and box are only read).
        """
        dets = self._detections
        if iou_type == "segm":
            from faster_coco_eval.core import mask as fce_mask

            rles = [det["segmentation"] for det in dets]
            areas, boxes = fce_mask.area(rles), fce_mask.toBbox(rles)
            annotations = [
                {
                    "image_id": det["image_id"],
                    "category_id": det["category_id"],
                    "score": det["score"],
                    "segmentation": det["segmentation"],
                    "area": area,
                    "bbox": box,
                    "id": index,
                    "iscrowd": 0,
                }
                for index, (det, area, box) in enumerate(zip(dets, areas, boxes, strict=True), start=1)
            ]
        else:
            annotations = [
                {
                    **det,
                    "bbox": list(det["bbox"]),
                    "area": det["bbox"][2] * det["bbox"][3],
                    "id": index,
                    "iscrowd": 0,
                }
                for index, det in enumerate(dets, start=1)
            ]
        return {
            "images": list(gt_dataset["images"]),
            "categories": [dict(c) for c in gt_dataset["categories"]],
            "annotations": annotations,
        }


def scored_ids_file(results: Path) -> Path:
    """Where `write_results(results)` lists the scored image ids (predictions.imgIds.json)."""
    return results.with_suffix(".imgIds.json")


class _SourceTruth:
    """A dataset's own COCO ground truth, indexed by image id once, handed out per evaluated image set."""

    def __init__(self, dataset: dict[str, Any]) -> None:
        categories = dataset.get("categories", [])
        if len(categories) != 1:
            names = [c.get("name") for c in categories]
            raise ValueError(f"ground_truth: categories {names}; expected exactly one (the person category)")
        self.category = dict(categories[0])
        self.images = {int(image["id"]): image for image in dataset["images"]}
        self.annotations: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self.images}
        for annotation in dataset["annotations"]:
            self.annotations[int(annotation["image_id"])].append(annotation)

    def check(self, image_id: int, height: int, width: int) -> None:
        image = self.images.get(image_id)
        if image is None:
            raise ValueError(f"image_id {image_id} is not in the ground truth's images")
        if (int(image["height"]), int(image["width"])) != (height, width):
            raise ValueError(
                f"image {image_id}: target is {height}x{width} but the ground truth says "
                f"{image['height']}x{image['width']}; expected targets at the original resolution"
            )

    def restricted(self, image_ids: set[int]) -> dict[str, Any]:
        ids = [image_id for image_id in self.images if image_id in image_ids]
        return {
            "images": [dict(self.images[i]) for i in ids],
            "annotations": [_copy_annotation(a) for i in ids for a in self.annotations[i]],
            "categories": [dict(self.category)],
        }


def _copy_annotation(ann: dict[str, Any]) -> dict[str, Any]:
    # The COCO APIs mutate annotation dicts (loadRes sets id/area, COCOeval adds "ignore"): hand out copies
    # one level deep so the accumulated state stays pristine across evaluate() calls.
    return {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in ann.items()
    }
