"""Model building: 2-class heads, torchvision weight names, and local checkpoints loaded with weights_only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from masksweep.errors import ConfigError
from masksweep.model import _verify_enum, build_model

TINY = {"arch": "maskrcnn_resnet18_fpn", "min_size": 64, "max_size": 64}


def test_weight_enum_names_resolve_and_bad_names_are_rejected() -> None:
    assert _verify_enum("maskrcnn_resnet50_fpn", "COCO_V1") is MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    assert _verify_enum("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.DEFAULT") is (
        MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    )
    with pytest.raises(ConfigError, match="model.weights.*COCO_V2.*allowed"):
        build_model("maskrcnn_resnet50_fpn", weights="COCO_V2")


def test_checkpoint_with_other_heads_loads_without_them(tmp_path: Path, caplog) -> None:
    source = build_model(num_classes=5, **TINY)
    path = tmp_path / "pretrained.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # a masksweep checkpoint
    with caplog.at_level(logging.INFO, logger="masksweep.model"):
        model = build_model(num_classes=2, weights=str(path), **TINY)
    backbone_key = "backbone.body.conv1.weight"
    assert torch.equal(model.state_dict()[backbone_key], source.state_dict()[backbone_key])
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    # cls_score, bbox_pred and mask_fcn_logits, weight and bias each: named in the log
    assert "without 6 mismatched tensors" in caplog.text and "mask_fcn_logits.weight" in caplog.text


def test_bare_state_dict_loads_exactly(tmp_path: Path) -> None:
    source = build_model(**TINY)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(weights=str(path), **TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class NotATensor:
    pass


@pytest.mark.parametrize("payload", [{"model": NotATensor()}, [1, 2, 3]])
def test_unsafe_or_foreign_checkpoints_are_rejected(tmp_path: Path, payload) -> None:
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(ConfigError, match="model.weights"):
        build_model(weights=str(path), **TINY)


def test_missing_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.pt"):
        build_model(weights=str(tmp_path / "missing.pt"), **TINY)


def test_slim_box_head_and_roi_sampling_shrink_the_preset() -> None:
    standard = build_model(**TINY)
    slim = build_model(box_head_size=256, roi_sampling_ratio=1, **TINY)
    assert slim.roi_heads.box_head.fc6.out_features == 256
    assert slim.roi_heads.box_predictor.cls_score.in_features == 256
    assert slim.roi_heads.box_roi_pool.sampling_ratio == slim.roi_heads.mask_roi_pool.sampling_ratio == 1
    assert standard.roi_heads.box_roi_pool.sampling_ratio == 2
    saved = sum(p.numel() for p in standard.parameters()) - sum(p.numel() for p in slim.parameters())
    fc6 = 256 * 7 * 7 * (1024 - 256) + (1024 - 256)  # weight and bias
    fc7 = (1024 * 1024 + 1024) - (256 * 256 + 256)
    predictors = (1024 - 256) * (2 + 2 * 4)  # class scores and boxes for 2 classes
    assert saved == fc6 + fc7 + predictors
    slim.eval()
    (output,) = slim([torch.rand(3, 64, 64)])
    assert output["masks"].shape[-2:] == (64, 64)
