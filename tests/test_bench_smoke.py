"""`make bench-smoke`: the benchmark harness runs end to end on tiny sizes and writes well-formed results.

Speed is never asserted here (the figures' numbers live only in the benchmark output); this checks that every
figure ran, and that bench/results-style latest.json / latest.md have the documented shape. Figure 3b (a TPE
search with vs without pruning), figure 5's floor comparison, figure 8 (batch vs asynchronous slots) and
figure 9 (chaos on the SLURM fixture, skipped with its reason where SLURM is not installed) run at tiny sizes;
the GPU check's --dry-run runs bench/gpu_check.sh end to end on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"1", "2", "3a", "3b", "4", "5", "6", "7", "8", "9", "P"}
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
    assert set(figures) >= FIGURES
    for figure in figures.values():
        assert figure["error"] is None, (figure["id"], figure["error"])
        assert figure["status"] in STATUSES, figure
        assert figure["title"] and (figure["setup"] or figure["id"] == "6")


def test_metrics_carry_median_min_max(results: tuple[dict, str]) -> None:
    data, _ = results
    for figure in data["figures"]:
        if figure["id"] == "6" or "skipped" in figure["details"]:  # no GPU / no SLURM here
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
    for figure_id in ("1", "2", "3a", "3b", "4", "5", "6"):
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


def test_search_figure_compares_both_sides_per_seed(results: tuple[dict, str]) -> None:
    data, markdown = results
    fig = next(f for f in data["figures"] if f["id"] == "3b")
    per_seed = fig["details"]["per_seed"]
    assert per_seed and all(
        p["steps_without"] > 0 and p["steps_with"] <= p["steps_without"] for p in per_seed
    )
    for p in per_seed:  # the ratios are the per-seed quotients of what was counted
        assert p["steps_ratio"] == round(p["steps_with"] / p["steps_without"], 4)
    names = {t["name"] for t in fig["targets"]}
    assert any(n.startswith("steps with / without") for n in names)
    assert any(n.startswith("best value with / without") for n in names)
    replayed = fig["details"]["pruner_replay"]["settings"]
    assert len(replayed) >= 5 and all(0 < r["steps_ratio"]["median"] <= 1 for r in replayed)
    # The search space is sweeps/tpe.yaml's: every trial carries its sampled optimizer and lr.
    trials = [
        t for side in ("trials_with", "trials_without") for ts in fig["details"][side].values() for t in ts
    ]
    assert trials and all({"optimizer", "lr"} <= set(t["params"]) for t in trials)
    assert "Optuna's pruners replayed" in markdown


def test_compare_is_measured_against_the_mlflow_floor(results: tuple[dict, str]) -> None:
    data, _ = results
    fig = next(f for f in data["figures"] if f["id"] == "5")
    floor = next(v for k, v in fig["metrics"].items() if k.endswith("floor: import mlflow + search_runs"))
    ratio = next(v for k, v in fig["metrics"].items() if k.endswith("command with chart / floor"))
    assert floor["median"] > 0 and ratio["n"] == floor["n"]
    assert any("floor" in t["name"] for t in fig["targets"])


def test_slot_figure_runs_both_schedules_on_the_same_trials(results: tuple[dict, str]) -> None:
    data, markdown = results
    fig = next(f for f in data["figures"] if f["id"] == "8")
    sides = fig["details"]["sides"]
    assert set(sides) == {"asynchronous", "batch"}
    for side in sides.values():  # never more jobs in flight than slots, and some slot time was busy
        assert 0 < side["utilization"] <= 1 and side["span_s"] <= side["wall_s"]
    assert {t["name"] for t in fig["targets"]} == {
        "asynchronous slot utilization",
        "asynchronous / batch time to n_trials",
    }
    assert "| asynchronous |" in markdown and "| batch |" in markdown


def test_chaos_figure_ends_with_n_trials_or_says_why_it_was_skipped(results: tuple[dict, str]) -> None:
    data, _ = results
    fig = next(f for f in data["figures"] if f["id"] == "9")
    if "skipped" in fig["details"]:
        assert fig["details"]["skipped"].startswith("skipped: SLURM is not installed")
        assert fig["status"] == "not measured"
        return
    details = fig["details"]
    assert details["counts"]["finished"] == 20 and details["running_at_end"] == 0
    assert details["hits"] and {h["action"] for h in details["hits"]} <= {"scancel", "requeue"}
    assert 0 < details["compute"]["slot_utilization"] <= 1


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """bench/gpu_check.sh --dry-run: figure 6's measurement and the 2-trial sweep (one trial diverges) on the
    CPU at tiny sizes, results where RESULTS says (and copied to OUT, as on the device machine)."""
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, RESULTS=str(tmp_path / "results"), OUT=str(out), GPU_CACHE=str(tmp_path / "cache"))
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    sweep = json.loads((out / "gpu_sweep.json").read_text())
    assert sweep["dry_run"] and all(sweep["checks"].values()), sweep["checks"]
    states = sorted((t["experiment"], t["state"], t["diverged"]) for t in sweep["trials"])
    assert states == [("diverge", "PRUNED", True), ("trial1", "COMPLETE", False)]
    figure6 = next(f for f in json.loads((out / "latest.json").read_text())["figures"] if f["id"] == "6")
    assert figure6["error"] is None and any(k.endswith("throughput") for k in figure6["metrics"])
    assert (out / "gpu_check.log").read_text().count("dry run: no install") == 1


def test_gpu_check_rejects_an_unknown_option() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--fast"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_check.sh: unknown option '--fast'; allowed: --dry-run, --fetch-wheels"
