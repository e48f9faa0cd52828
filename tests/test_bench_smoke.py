"""`make bench-smoke`: the benchmark harness runs end to end on tiny sizes and writes well-formed results.

Speed is never asserted here (the figures' numbers live only in the benchmark output); this checks that every
figure ran, and that bench/results-style latest.json / latest.md have the documented shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"1", "2", "3", "4", "5", "6", "P"}
STATUSES = {"met", "missed", "not measured", "reported"}
TARGET_STATUSES = {"met", "missed", "not measured"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-results")
    cache = tmp_path_factory.mktemp("bench-cache")
    command = [
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--threads",
        "1",  # robust on a busy CI runner; speed is not what this test checks
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


def test_every_figure_ran_without_error(results: tuple[dict, str]) -> None:
    data, _ = results
    figures = {f["id"]: f for f in data["figures"]}
    assert set(figures) == FIGURES
    for figure in figures.values():
        assert figure["error"] is None, (figure["id"], figure["error"])
        assert figure["status"] in STATUSES, figure
        assert figure["title"] and (figure["setup"] or figure["id"] == "6")


def test_metrics_carry_median_min_max(results: tuple[dict, str]) -> None:
    data, _ = results
    for figure in data["figures"]:
        if figure["id"] == "6":
            continue
        assert figure["metrics"], figure["id"]
        for name, metric in figure["metrics"].items():
            assert metric["n"] >= 1, name
            if "median" in metric and metric["median"] is not None:
                assert metric["min"] <= metric["median"] <= metric["max"], name
                assert len(metric["values"]) == metric["n"], name


def test_targets_are_stated_with_a_status(results: tuple[dict, str]) -> None:
    data, _ = results
    targets = {(f["id"], t["name"]): t for f in data["figures"] for t in f["targets"]}
    for figure_id in ("1", "2", "3", "4", "5", "6"):
        assert any(key[0] == figure_id for key in targets), f"figure {figure_id} states no target"
    for target in targets.values():
        assert target["status"] in TARGET_STATUSES and target["target"]
    gpu = [t for (fid, _), t in targets.items() if fid == "6"]
    assert all(t["status"] == "not measured" for t in gpu)  # no --device cuda here


def test_machine_and_versions_are_recorded(results: tuple[dict, str]) -> None:
    data, _ = results
    machine, versions = data["machine"], data["versions"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["memory_gib"] > 0
    for package in ("python", "torch", "torchvision", "optuna", "mlflow", "faster-coco-eval", "pycocotools"):
        assert versions[package], package
    assert data["preset"] == "smoke" and data["duration_s"] > 0


def test_markdown_summarises_every_figure(results: tuple[dict, str]) -> None:
    data, markdown = results
    assert markdown.startswith("# masksweep benchmark results")
    assert "## Targets" in markdown and "## Machine and versions" in markdown
    for figure in data["figures"]:
        assert f"## {figure['id']}. {figure['title']}" in markdown
    assert "not measured" in markdown  # figure 6 without a GPU
