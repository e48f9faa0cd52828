"""Mask R-CNN built with torchvision's builders, with 2-class (background, person) heads.

Pretrained weights come by torchvision enum name (downloaded, or found in torch.hub's cache) or from a local
file. However they arrive, the model is the one torchvision's builder makes for trained weights (its norm
layers and frozen backbone layers), and the weights are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, WeightsEnum, resnet50
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from masksweep.errors import ConfigError
from masksweep.pretrain import ensure_pretrained

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _looks_like_path(weights: str) -> bool:
    return weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights or Path(weights).exists()


def _maskrcnn_resnet18_fpn(
    weights: None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int = 5,
    **kwargs: Any,
) -> MaskRCNN:
    # torchvision ships no ResNet-18 Mask R-CNN builder; compose its FPN backbone helper with MaskRCNN.
    backbone_weights = ResNet18_Weights.verify(weights_backbone)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=backbone_weights,
        # torchvision's rule for ImageNet backbones: freeze BatchNorm statistics learnt from large batches.
        norm_layer=FrozenBatchNorm2d if backbone_weights is not None else nn.BatchNorm2d,
        trainable_layers=trainable_backbone_layers,
    )
    return MaskRCNN(backbone, **kwargs)


def _resnet50_fpn_pretrained(trainable_backbone_layers: int, **kwargs: Any) -> MaskRCNN:
    """maskrcnn_resnet50_fpn as its builder composes it for trained weights, without loading them."""
    backbone = resnet50(norm_layer=FrozenBatchNorm2d)
    return MaskRCNN(_resnet_fpn_extractor(backbone, trainable_backbone_layers), **kwargs)


def _resnet50_fpn_v2_pretrained(trainable_backbone_layers: int, **kwargs: Any) -> MaskRCNN:
    """maskrcnn_resnet50_fpn_v2 as its builder makes it for trained weights: its own heads, and a backbone
    that keeps BatchNorm2d (as in v2) with only the top `trainable_backbone_layers` trained."""
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kwargs)
    model.backbone = _resnet_fpn_extractor(resnet50(), trainable_backbone_layers, norm_layer=nn.BatchNorm2d)
    return model


@dataclass(frozen=True)
class Arch:
    """One architecture: `build` is its builder, used when there are no full-model weights (it downloads
    `weights_backbone` itself); `pretrained` makes the model `build` would make for trained weights, without
    loading any; `weights` are torchvision's full-model weights for it, if any."""

    build: Callable[..., MaskRCNN]
    pretrained: Callable[..., MaskRCNN]
    weights: type[WeightsEnum] | None


ARCHS = {
    "maskrcnn_resnet50_fpn": Arch(
        maskrcnn_resnet50_fpn, _resnet50_fpn_pretrained, MaskRCNN_ResNet50_FPN_Weights
    ),
    "maskrcnn_resnet50_fpn_v2": Arch(
        maskrcnn_resnet50_fpn_v2, _resnet50_fpn_v2_pretrained, MaskRCNN_ResNet50_FPN_V2_Weights
    ),
    # The tiny preset's full-model weights (its cached pretraining, a masksweep checkpoint) were trained with
    # live BatchNorm at the trials' batch size: the same model with or without them.
    "maskrcnn_resnet18_fpn": Arch(_maskrcnn_resnet18_fpn, _maskrcnn_resnet18_fpn, None),
}

# maskrcnn_resnet50_fpn loads these weights with FrozenBatchNorm2d eps 0, the value they were trained with.
EPS_ZERO = (MaskRCNN_ResNet50_FPN_Weights.COCO_V1,)


def hub_file(member: WeightsEnum) -> Path:
    """Where torch.hub keeps `member` once downloaded: <torch.hub.get_dir()>/checkpoints/<file of its url>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(member.url).path).name


def _allowed_weights(arch: str) -> str:
    enum = ARCHS[arch].weights
    names = "" if enum is None else ", DEFAULT, " + ", ".join(f"{enum.__name__}.{w.name}" for w in enum)
    return f"null, a checkpoint path{names}"


def _verify_enum(arch: str, weights: str) -> WeightsEnum:
    """The torchvision weights enum member named by `weights` (e.g. "COCO_V1", "DEFAULT" or its full name)."""
    enum = ARCHS[arch].weights
    if enum is None:
        raise ConfigError(
            "model.weights", weights, f"{_allowed_weights(arch)} (torchvision has no such weights)"
        )
    try:
        return enum.verify(weights)
    except (KeyError, ValueError) as exc:
        raise ConfigError("model.weights", weights, _allowed_weights(arch)) from exc


@dataclass(frozen=True)
class PretrainedWeights:
    """Full-model weights: `member` is the torchvision weights they are, when known; `path` the local file
    holding them, or None when torchvision must download them."""

    member: WeightsEnum | None
    path: Path | None

    @property
    def label(self) -> str:
        parts = [repr(self.member)] if self.member is not None else []
        if self.path is not None:
            parts.append(str(self.path))
        return " from ".join(parts)


def resolve_weights(arch: str, weights: str) -> PretrainedWeights:
    """Find `weights` without downloading: a path is used as given (under torch.hub's file name it counts as
    those torchvision weights), and an enum name is looked up in torch.hub's cache first."""
    enum = ARCHS[arch].weights
    if _looks_like_path(weights):
        path = Path(weights)
        named = [w for w in enum if hub_file(w).name == path.name] if enum is not None else []
        return PretrainedWeights(named[0] if named else None, path)
    member = _verify_enum(arch, weights)
    cached = hub_file(member)
    return PretrainedWeights(member, cached if cached.is_file() else None)


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


def _download(member: WeightsEnum, weights: str) -> dict[str, torch.Tensor]:
    """torchvision's own download (hash checked), read with weights_only=True; offline, one clear line."""
    try:
        return member.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(
            "model.weights",
            weights,
            f"weights that can be read here, but downloading {member!r} failed ({reason}): put "
            f"{hub_file(member).name} in {hub_file(member).parent} (torch.hub's cache under TORCH_HOME), "
            "or pass the file's path as model.weights",
        ) from exc


def load_state(pretrained: PretrainedWeights, weights: str) -> dict[str, torch.Tensor]:
    """The tensors of `pretrained`; `weights` is what the config said, for the error message."""
    if pretrained.path is not None:
        return read_state_dict(pretrained.path)
    return _download(pretrained.member, weights)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load the tensors whose shapes match; returns the keys left out (e.g. heads for another class count).

    load_state_dict does the rest, so modules handle their own legacy keys (FrozenBatchNorm2d drops the
    num_batches_tracked of a BatchNorm2d checkpoint)."""
    own = model.state_dict()
    skipped = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    missing = sorted(set(result.missing_keys) - set(skipped))
    if result.unexpected_keys or missing:
        detail = f"unexpected keys {result.unexpected_keys[:3]}" if result.unexpected_keys else ""
        detail += f"{', ' if detail else ''}missing keys {missing[:3]}" if missing else ""
        raise ConfigError("model.weights", source, f"a checkpoint of this architecture ({detail})")
    if skipped:
        log.info(
            "Loaded %s without %d mismatched tensors (heads for another class count): %s",
            source,
            len(skipped),
            ", ".join(skipped),
        )
    return skipped


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


def _backbone_summary(model: MaskRCNN, trainable_layers: int) -> str:
    """What a pretrained build decided, e.g. "FrozenBatchNorm2d, 3 trainable layers (99/159 tensors)"."""
    body = model.backbone.body
    norms = {type(m).__name__ for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
    trainable = sum(p.requires_grad for p in body.parameters())
    total = sum(1 for _ in body.parameters())
    return f"{'/'.join(sorted(norms))}, {trainable_layers} trainable layers ({trainable}/{total} tensors)"


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
    read_weights: bool = True,
) -> MaskRCNN:
    """Build `arch` with `num_classes` heads.

    `weights` is null, a torchvision weights enum name (e.g. "DEFAULT" or
    "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"; taken from torch.hub's cache under TORCH_HOME, else downloaded),
    or a local checkpoint path. With null weights and `pretrain.enabled`, the model starts from a cached
    one-time pretraining on synthetic data (pretrain.py).

    `read_weights=False` builds the model these weights make without reading, downloading or pretraining
    anything: for restoring a checkpoint of it, whose own tensors are loaded next.
    """
    if arch not in ARCHS:
        raise ConfigError("model.arch", arch, ", ".join(ARCHS))
    if isinstance(trainable_backbone_layers, bool) or trainable_backbone_layers not in range(6):
        raise ConfigError("model.trainable_backbone_layers", trainable_backbone_layers, "an integer 0..5")
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
    pretrained = None if weights is None else resolve_weights(arch, weights)
    if read_weights and pretrained is None and pretrain is not None and pretrain.get("enabled"):
        # The spec keys the cache; pretraining starts from this same model with random weights.
        cached = ensure_pretrained(spec, pretrain, functools.partial(build_model, **spec))
        pretrained = PretrainedWeights(None, cached)
    # Heads are built for num_classes directly; weights for another class count load without theirs.
    kwargs = dict(detector or {}, num_classes=num_classes, min_size=min_size, max_size=max_size)
    if pretrained is None:
        model = ARCHS[arch].build(
            weights=None,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    else:
        # Full-model weights supersede weights_backbone, as in torchvision's builders.
        model = ARCHS[arch].pretrained(trainable_backbone_layers=trainable_backbone_layers, **kwargs)
    if mask_head_channels is not None:
        slim_mask_head(model, mask_head_channels, num_classes)
    if box_head_size is not None:
        slim_box_head(model, box_head_size, num_classes)
    if roi_sampling_ratio is not None:
        set_roi_sampling_ratio(model, roi_sampling_ratio)
    if pretrained is not None and pretrained.member in EPS_ZERO:
        overwrite_eps(model, 0.0)
    if pretrained is not None and read_weights:
        load_matching(model, load_state(pretrained, weights or str(pretrained.path)), pretrained.label)
        summary = _backbone_summary(model, trainable_backbone_layers)
        log.info("Built %s from %s; backbone: %s", arch, pretrained.label, summary)
    return model
