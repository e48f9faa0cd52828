"""Mask R-CNN built with torchvision's builders, with 2-class (background, person) heads."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.detection import (
    MaskRCNN,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from masksweep.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _looks_like_path(weights: str) -> bool:
    return weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights or Path(weights).exists()


def _maskrcnn_resnet18_fpn(
    weights: None, weights_backbone: str | None, trainable_backbone_layers: int, **kwargs: Any
) -> MaskRCNN:
    # torchvision ships no ResNet-18 Mask R-CNN builder; compose its FPN backbone helper with MaskRCNN.
    backbone_weights = ResNet18_Weights.verify(weights_backbone)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=backbone_weights,
        # torchvision's own rule: freeze BatchNorm statistics only when they were pretrained.
        norm_layer=FrozenBatchNorm2d if backbone_weights is not None else nn.BatchNorm2d,
        trainable_layers=trainable_backbone_layers,
    )
    return MaskRCNN(backbone, **kwargs)


def _verify_enum(arch: str, weights: str):
    """The torchvision weights enum member named by `weights` (e.g. "COCO_V1", "DEFAULT" or its full name)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum.verify(weights)
    except (KeyError, ValueError) as exc:
        allowed = ", ".join(f"{enum.__name__}.{w.name}" for w in enum)
        raise ConfigError("model.weights", weights, f"null, a checkpoint path, DEFAULT, {allowed}") from exc


BUILDERS = {
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
    "maskrcnn_resnet18_fpn": _maskrcnn_resnet18_fpn,
}


def slim_mask_head(model: MaskRCNN, channels: Sequence[int], num_classes: int) -> None:
    """A lighter mask head: `channels` conv layers instead of torchvision's 4 x 256. On a CPU the mask head
    on every positive RoI costs more than the whole ResNet-18 backbone. BatchNorm, as in torchvision's v2
    model: without it, a head trained from scratch at a high lr loses its ReLUs and predicts one blob."""
    in_channels = model.backbone.out_channels
    model.roi_heads.mask_head = MaskRCNNHeads(
        in_channels, list(channels), dilation=1, norm_layer=nn.BatchNorm2d
    )
    model.roi_heads.mask_predictor = MaskRCNNPredictor(channels[-1], channels[-1], num_classes)


def slim_box_head(model: MaskRCNN, representation_size: int, num_classes: int) -> None:
    """A narrower box head: torchvision's TwoMLPHead maps 256 x 7 x 7 RoI features to 1024, a 12.8 M
    parameter layer that is 45% of a ResNet-18 Mask R-CNN and its largest matrix product."""
    pool = model.roi_heads.box_roi_pool.output_size
    resolution = pool[0] if isinstance(pool, (list, tuple)) else pool
    model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * resolution**2, representation_size)
    model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes)


def set_roi_sampling_ratio(model: MaskRCNN, ratio: int) -> None:
    """Bilinear samples per RoI bin side in the box and mask RoIAlign (torchvision: 2). On a CPU the
    RoIAlign backward pass is single-threaded and ~30% of a tiny-preset step; 1 sample quarters it."""
    model.roi_heads.box_roi_pool.sampling_ratio = ratio
    model.roi_heads.mask_roi_pool.sampling_ratio = ratio


def replace_heads(model: MaskRCNN, num_classes: int) -> None:
    """Swap the box and mask predictors for `num_classes`, as in torchvision's fine-tuning tutorial."""
    box_in = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
    mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
    hidden = model.roi_heads.mask_predictor.conv5_mask.out_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, hidden, num_classes)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a bare state dict or a masksweep checkpoint holding one under "model"."""
    if not path.is_file():
        raise ConfigError(
            "model.weights", str(path), "an existing checkpoint file or a torchvision weights name"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a usable checkpoint"
        raise ConfigError("model.weights", str(path), f"a loadable torch checkpoint ({exc})") from exc
    state = payload.get("model", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("model.weights", str(path), "a checkpoint holding a state dict of tensors")
    return dict(state)


def load_checkpoint_weights(model: torch.nn.Module, path: Path) -> list[str]:
    """Load weights whose shapes match; returns the keys left out (e.g. heads trained for other classes)."""
    state = read_state_dict(path)
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ConfigError(
            "model.weights", str(path), f"a checkpoint of this architecture (unexpected keys {unknown[:3]})"
        )
    skipped = sorted(k for k, v in state.items() if v.shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if skipped:
        log.info(
            "Loaded %s without %d mismatched tensors (heads for another class count): %s",
            path,
            len(skipped),
            ", ".join(skipped),
        )
    return skipped


def build_model(
    arch: str,
    num_classes: int = 2,
    weights: str | None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    detector: Mapping[str, Any] | None = None,
    mask_head_channels: Sequence[int] | None = None,
    box_head_size: int | None = None,
    roi_sampling_ratio: int | None = None,
    pretrain: Mapping[str, Any] | None = None,
) -> MaskRCNN:
    """Build `arch` with `num_classes` heads.

    `weights` is null, a torchvision weights enum name (e.g. "DEFAULT" or
    "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"; downloaded when online), or a local checkpoint path loaded with
    weights_only=True. With null weights and `pretrain.enabled`, the model starts from a cached one-time
    pretraining on synthetic data (pretrain.py).
    """
    if arch not in BUILDERS:
        raise ConfigError("model.arch", arch, ", ".join(BUILDERS))
    checkpoint = Path(weights) if weights is not None and _looks_like_path(weights) else None
    if weights is None and pretrain is not None and pretrain.get("enabled"):
        from masksweep.pretrain import ensure_pretrained

        spec = {
            "arch": arch,
            "num_classes": num_classes,
            "weights_backbone": weights_backbone,
            "trainable_backbone_layers": trainable_backbone_layers,
            "min_size": min_size,
            "max_size": max_size,
            "detector": dict(detector or {}),
            "mask_head_channels": None if mask_head_channels is None else list(mask_head_channels),
            "box_head_size": box_head_size,
            "roi_sampling_ratio": roi_sampling_ratio,
        }
        checkpoint = ensure_pretrained(spec, pretrain)
    if weights is not None and checkpoint is None and arch == "maskrcnn_resnet18_fpn":
        raise ConfigError(
            "model.weights", weights, "null or a checkpoint path (torchvision has no such weights)"
        )
    enum_weights = None if checkpoint is not None or weights is None else _verify_enum(arch, weights)
    kwargs = dict(detector or {}, min_size=min_size, max_size=max_size)
    if enum_weights is None:
        # Heads are built for num_classes directly; pretrained enum weights need their own class count first.
        kwargs["num_classes"] = num_classes
    model = BUILDERS[arch](
        weights=enum_weights,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )
    if enum_weights is not None:
        replace_heads(model, num_classes)
    if mask_head_channels is not None:
        slim_mask_head(model, mask_head_channels, num_classes)
    if box_head_size is not None:
        slim_box_head(model, box_head_size, num_classes)
    if roi_sampling_ratio is not None:
        set_roi_sampling_ratio(model, roi_sampling_ratio)
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    return model
