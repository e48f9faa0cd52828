"""Pretrained weights give the same model however they arrive: torchvision enum, torch.hub's cache, or a path.

The reference is torchvision's own builder called with `weights=COCO_V1`, with only its download replaced
by the file made here (a real download is impossible offline, and its hash could not match a made-up file).
Files are in torchvision's format: the state dict of a 91-class model, saved under the name torch.hub
caches it as.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision.models._api as tv_api
from hydra.utils import instantiate
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import (
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from masksweep import model as model_module
from masksweep.errors import ConfigError
from masksweep.model import build_model, hub_file

V1 = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
V2 = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1
SMALL = {"min_size": 64, "max_size": 64}  # the transform's sizes do not change the modules compared here


def torchvision_file(directory: Path, builder: Callable[..., nn.Module], member: WeightsEnum) -> Path:
    """A file in the format torchvision publishes `member` in, under its torch.hub cache name."""
    classes = len(member.meta["categories"])
    state = builder(weights=None, weights_backbone=None, num_classes=classes).state_dict()
    if builder is maskrcnn_resnet50_fpn:
        # Published from a FrozenBatchNorm2d model, which has no num_batches_tracked buffers; the
        # reference's strict load_state_dict checks that the key set is exactly the published one.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = directory / hub_file(member).name
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def v1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torchvision_file(tmp_path_factory.mktemp("v1"), maskrcnn_resnet50_fpn, V1)


@pytest.fixture(scope="session")
def v2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torchvision_file(tmp_path_factory.mktemp("v2"), maskrcnn_resnet50_fpn_v2, V2)


def structure(model: nn.Module) -> dict[str, object]:
    """What must agree between two builds: each module's type, FrozenBatchNorm2d eps, and which parameters
    train. Head shapes differ (91 vs 2 classes) and are not compared."""
    return {
        "modules": {name: type(module).__name__ for name, module in model.named_modules()},
        "eps": {name: m.eps for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)},
        "trainable": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def torchvision_reference(
    builder: Callable[..., nn.Module], member: WeightsEnum, path: Path, layers: int
) -> dict[str, object]:
    """torchvision's builder with `weights=member`: the real enum path, with the download replaced only."""
    state = torch.load(path, weights_only=True)

    def downloaded(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        assert url == member.url
        return state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tv_api, "load_state_dict_from_url", downloaded)
        return structure(builder(weights=member, trainable_backbone_layers=layers, **SMALL))


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME where any download fails the test: weights must come from its cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch"


def into_cache(torch_home: Path, path: Path, member: WeightsEnum) -> None:
    cached = torch_home / "hub" / "checkpoints" / path.name
    assert cached == hub_file(member)  # torch.hub's own lookup place, under TORCH_HOME
    cached.parent.mkdir(parents=True)
    cached.symlink_to(path)


def test_the_cache_name_is_torchvisions() -> None:
    assert hub_file(V1).name == "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


def test_weights_path_builds_what_torchvision_builds_for_coco_v1(make_cfg, v1_file: Path, caplog) -> None:
    cfg = make_cfg("model=maskrcnn_resnet50_fpn", f"model.weights={v1_file}", "model.min_size=64", tiny=False)
    with caplog.at_level(logging.INFO, logger="masksweep.model"):
        model = instantiate(cfg.model)
    assert structure(model) == torchvision_reference(maskrcnn_resnet50_fpn, V1, v1_file, layers=3)
    body = model.backbone.body
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 53
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad} == {
        "layer2", "layer3", "layer4"
    }
    # The file's tensors are loaded, except the heads for 91 classes, which the log names.
    state = torch.load(v1_file, weights_only=True)
    key = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(model.state_dict()[key], state[key])
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert "without 6 mismatched tensors" in caplog.text
    assert "roi_heads.box_predictor.cls_score.weight" in caplog.text
    assert "MaskRCNN_ResNet50_FPN_Weights.COCO_V1 from" in caplog.text and "FrozenBatchNorm2d" in caplog.text


def test_enum_name_takes_the_file_from_torch_home_without_a_download(torch_home: Path, v1_file: Path) -> None:
    into_cache(torch_home, v1_file, V1)
    model = build_model("maskrcnn_resnet50_fpn", weights="COCO_V1", trainable_backbone_layers=1, **SMALL)
    assert structure(model) == torchvision_reference(maskrcnn_resnet50_fpn, V1, v1_file, layers=1)
    state = torch.load(v1_file, weights_only=True)
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_v2_from_torch_home_is_torchvisions_v2_model(torch_home: Path, v2_file: Path) -> None:
    into_cache(torch_home, v2_file, V2)
    model = build_model("maskrcnn_resnet50_fpn_v2", weights="DEFAULT", trainable_backbone_layers=2, **SMALL)
    # v2 keeps BatchNorm2d with trained weights; only the frozen layers change.
    assert structure(model) == torchvision_reference(maskrcnn_resnet50_fpn_v2, V2, v2_file, layers=2)
    body = model.backbone.body
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_restoring_a_checkpoint_rebuilds_the_model_without_its_weights(torch_home: Path, v1_file) -> None:
    """read_weights=False (e.g. `masksweep evaluate` on a fine-tuned run): nothing read or downloaded."""
    model = build_model("maskrcnn_resnet50_fpn", weights="COCO_V1", read_weights=False, **SMALL)
    assert structure(model) == torchvision_reference(maskrcnn_resnet50_fpn, V1, v1_file, layers=3)


def test_enum_weights_offline_fail_in_one_line_naming_the_way_out(torch_home: Path, monkeypatch) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # torchvision's real download path, up to the network
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as caught:
        build_model("maskrcnn_resnet50_fpn", weights="COCO_V1", **SMALL)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config error: model.weights=")
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in message and str(hub_file(V1).parent) in message
    assert "TORCH_HOME" in message and "name resolution" in message


def test_tiny_preset_from_its_cache_is_the_model_from_that_file_by_path(tmp_path: Path, monkeypatch) -> None:
    """The tiny preset's pretrained weights arrive from its cache or by path: one model either way."""
    preset = {"arch": "maskrcnn_resnet18_fpn", "trainable_backbone_layers": 4, "box_head_size": 64, **SMALL}
    source = build_model(**preset)
    pretrain = {"enabled": True, "cache_dir": str(tmp_path), "steps": 1}
    captured: dict[str, Path] = {}

    def cached(spec, recipe, build) -> Path:  # the cache already holds these weights: no pretraining
        captured["path"] = tmp_path / "cached.pt"
        torch.save(source.state_dict(), captured["path"])
        return captured["path"]

    monkeypatch.setattr(model_module, "ensure_pretrained", cached)
    from_cache = build_model(**preset, pretrain=pretrain)
    by_path = build_model(**preset, weights=str(captured["path"]))
    assert structure(from_cache) == structure(by_path)
    assert structure(by_path)["trainable"]["backbone.body.conv1.weight"] is False  # 4 layers: conv1 frozen
    for model in (from_cache, by_path):
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_out_of_range_trainable_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.trainable_backbone_layers=6.*0..5"):
        build_model("maskrcnn_resnet18_fpn", trainable_backbone_layers=6, **SMALL)
