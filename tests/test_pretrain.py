"""The tiny preset's one-time pretraining: it says what it does, its cache ignores the data config, and
pretrain.py does not import model.py (the caller composes the model and hands pretrain a builder)."""

from __future__ import annotations

import ast
import itertools
import logging
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import masksweep.progress
from masksweep import model as model_module
from masksweep.model import build_model
from masksweep.pretrain import cache_path

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {"arch": "maskrcnn_resnet18_fpn", "min_size": 64, "max_size": 64, "box_head_size": 64}


class _Clock:
    """time.monotonic for masksweep.progress that moves 31 s per read: every step is "30 s later"."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def monotonic(self) -> float:
        return 31.0 * next(self._ticks)


def test_pretraining_says_why_for_how_long_how_to_skip_it_and_its_key(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(masksweep.progress, "time", _Clock())
    pretrain = {
        "enabled": True,
        "steps": 1,
        "lr": 0.001,
        "warmup_iters": 1,
        "batch_size": 2,
        "num_images": 2,
        "image_size": 64,
        "seed": 1000,
        "cache_dir": str(tmp_path / "pretrained"),
    }
    with caplog.at_level(logging.INFO):
        build_model(**TINY, pretrain=pretrain)
    text = caplog.text
    assert "model.weights is null and model.pretrain.enabled is true" in text  # why
    assert "Estimated under a minute" in text and "left" in text  # how long, before and while it runs
    assert "model.pretrain.enabled=false" in text  # how to turn it off
    assert "keyed by the model (arch, heads, min_size=64, max_size=64)" in text  # what reuses it
    cached = cache_path({**TINY}, pretrain)  # only the file name's arch is read here
    assert str(cached.parent) in text
    # Progress lines on the clock, though stderr is not a terminal under pytest.
    assert any(r.name == "masksweep.progress" and "epoch 1: step" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_model(**TINY, pretrain=pretrain)
    assert "Pretraining" not in caplog.text and "cached at" in caplog.text  # the second run reuses it


@pytest.mark.parametrize("data", ["coco", "pennfudan"])
def test_any_dataset_on_the_tiny_preset_reuses_the_synthetic_pretraining(make_cfg, monkeypatch, data) -> None:
    keys: list[Path] = []

    def capture(spec, pretrain, build) -> Path:
        keys.append(cache_path(spec, pretrain))
        raise RuntimeError("captured")  # only the key is wanted: stop before building anything

    monkeypatch.setattr(model_module, "ensure_pretrained", capture)
    for overrides in ((), (f"data={data}",)):
        with pytest.raises(InstantiationException, match="captured"):
            instantiate(make_cfg(*overrides, tiny=False).model)
    assert len(keys) == 2 and keys[0] == keys[1]


def _imports(module: str) -> set[str]:
    """Modules of masksweep that `module`'s source imports, at any depth of the file (lazy imports too)."""
    path = SRC / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = set()
    for name in names:
        while name.startswith("masksweep") and not _exists(name):
            name = name.rpartition(".")[0]
        if name.startswith("masksweep") and name != module:
            modules.add(name)
    return modules


def _exists(module: str) -> bool:
    path = SRC / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_pretrain_does_not_reach_model() -> None:
    seen, todo = set(), ["masksweep.pretrain"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module))
    assert "masksweep.data" in seen  # the walk does follow imports
    assert "masksweep.model" not in seen
