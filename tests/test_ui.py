"""`masksweep ui`: the MLflow UI on the embedded store lists the trial, over its REST API and in a browser."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
    "--virtual-time-budget=15000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> dict:
    """A tiny trial run with `masksweep-train` in its own directory: the store the UI serves."""
    cwd = tmp_path_factory.mktemp("ui-store")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args = [*TINY_OVERRIDES, f"data.cache_dir={synthetic_cache}"]
    result = subprocess.run(
        [str(BIN / "masksweep-train"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("masksweep")
    (run,) = client.search_runs([exp.experiment_id])
    return {
        "cwd": cwd,
        "experiment_id": exp.experiment_id,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
    }


@pytest.fixture(scope="module")
def ui(trial: dict) -> Iterator[dict]:
    """`masksweep ui` on a free loopback port; stopped (server and workers) at the end."""
    port = free_port()
    log_path = trial["cwd"] / "ui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "masksweep"), "ui", "--port", str(port)],
            cwd=trial["cwd"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "masksweep ui exited early"
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not come up"
                time.sleep(0.5)
        printed = lines.get(timeout=30)
        yield {**trial, "port": port, "base": base, "printed": printed}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        server_log = log_path.read_text()
        deadline = time.monotonic() + 30
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not port_open(port), "the MLflow server outlived `masksweep ui`:\n" + server_log[-2000:]


@pytest.mark.slow
def test_ui_prints_its_url_and_lists_the_trial_over_rest(ui: dict) -> None:
    assert ui["printed"].startswith(f"MLflow UI for sqlite:///{ui['cwd']}/mlruns/mlflow.db: ")
    assert f"{ui['base']}/#/experiments/{ui['experiment_id']}/runs" in ui["printed"]
    request = urllib.request.Request(
        ui["base"] + "/api/2.0/mlflow/runs/search",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [ui["experiment_id"]]}).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)["runs"]
    ours = [r for r in runs if r["info"]["run_id"] == ui["run_id"]]
    assert len(ours) == 1 and ours[0]["info"]["status"] == "FINISHED"
    assert {p["key"] for p in ours[0]["data"]["params"]} >= {"lr", "optimizer._target_", "git.commit"}


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
@pytest.mark.browser
def test_headless_chromium_shows_the_run(ui: dict, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        print("skipping the browser check: chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    url = f"{ui['base']}/#/experiments/{ui['experiment_id']}/runs"
    profile = tmp_path / "profile"
    run = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*run, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert ui["run_name"] in dom.stdout, "the run is not listed on the experiment's runs page"

    screenshot = tmp_path / "mlflow-ui.png"
    shot = subprocess.run(
        [*run, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=180
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    keep = os.environ.get("MASKSWEEP_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    print(f"screenshot of {url}: {screenshot}")


def test_port_in_use_is_a_one_line_error(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [str(BIN / "masksweep"), "ui", "--port", str(port)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    expected = f"masksweep ui: error: port {port} on 127.0.0.1 is in use; pick another with --port"
    assert result.stderr.strip() == expected
