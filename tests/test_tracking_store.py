"""Which MLflow store each tool uses ($MLFLOW_TRACKING_URI, the options), how a bad one fails, and run ids
given as prefixes."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY_OVERRIDES
from masksweep.errors import TrackingError
from masksweep.tracking import (
    CLI_OPTION,
    TRAIN_OPTION,
    check_store,
    checkpoint_dir_of_run,
    experiment_id,
    find_run,
    open_client,
    resolve_uri,
)
from masksweep.tracking.runs import RunNotFound


@contextmanager
def web_server(status: int, body: bytes = b"", content_type: str = "text/html") -> Iterator[str]:
    """A web server on 127.0.0.1 that answers every GET with `status` and `body`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------- store checks (unit)


def test_a_web_server_that_is_not_mlflow_is_named_in_each_tools_syntax(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with web_server(404, b"<html>Not Found</html>") as url:
        with pytest.raises(TrackingError) as info:
            check_store(url, TRAIN_OPTION)
        message = one_line(info)
        assert f"tracking.uri='{url}' is not an MLflow tracking server (HTTP 404" in message
        assert "allowed: a running MLflow server" in message and "tracking=none" in message
        with pytest.raises(TrackingError) as info:
            check_store(url, CLI_OPTION)
        message = one_line(info)
        assert f"--tracking-uri '{url}' is not an MLflow" in message
        assert "tracking.uri" not in message and "tracking=none" not in message  # masksweep-train's words
    with web_server(200, b"<html>a catch-all page</html>") as url, pytest.raises(TrackingError) as info:
        check_store(url)
    assert "not an MLflow tracking server" in one_line(info)
    with web_server(200, b'{"experiments": []}', "application/json") as url:
        assert check_store(url) == url  # what an MLflow server answers
    with web_server(401) as url:
        assert check_store(url) == url  # up behind authentication: MLflow's client sends the credentials


def test_a_sqlite_file_in_a_missing_directory_is_refused_not_created(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if not Path("/no-such-dir").exists():  # the issue's own example, at the filesystem root
        with pytest.raises(TrackingError) as info:
            open_client("sqlite:////no-such-dir/x.db")
        assert "the directory /no-such-dir does not exist" in one_line(info)
        assert not Path("/no-such-dir").exists()
    uri = f"sqlite:///{tmp_path}/missing/x.db"
    with pytest.raises(TrackingError) as info:
        open_client(uri, option=CLI_OPTION)
    message = one_line(info)
    assert message.startswith(f"--tracking-uri '{uri}': the directory {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "present").mkdir()
    client, _ = open_client(f"sqlite:///{tmp_path}/present/x.db")  # an existing directory: a new store
    assert client.get_experiment_by_name("Default") is not None
    with pytest.raises(TrackingError, match="no MLflow store at"):  # the reading commands create nothing
        check_store(f"sqlite:///{tmp_path}/present/y.db", CLI_OPTION, create=False)


def test_mlflow_tracking_uri_is_the_default_and_the_options_override_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from/env.db")
    assert resolve_uri(None, TRAIN_OPTION) == ("sqlite:///from/env.db", "MLFLOW_TRACKING_URI")
    assert resolve_uri("sqlite:///given.db", CLI_OPTION) == ("sqlite:///given.db", CLI_OPTION)
    with pytest.raises(TrackingError) as info:  # a bad value names the variable it came from
        check_store(None, CLI_OPTION)
    message = one_line(info)
    assert message.startswith("MLFLOW_TRACKING_URI='sqlite:///from/env.db'")
    assert "unset MLFLOW_TRACKING_URI (--tracking-uri overrides it)" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_uri(None) == (None, TRAIN_OPTION)  # empty = unset: the embedded store


# ------------------------------------------------------------------------------------------ run id prefixes


def test_a_unique_prefix_names_a_run(workdir: Path) -> None:
    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    other = experiment_id(client, "elsewhere", artifacts)
    run = client.create_run(exp, tags={"masksweep.checkpoint_dir": str(workdir / "ckpt")}).info.run_id
    far = client.create_run(other).info.run_id
    assert find_run(client, run).info.run_id == run
    assert find_run(client, run[:8]).info.run_id == run
    assert find_run(client, run[:6].upper()).info.run_id == run  # as hex, in either case
    assert find_run(client, far[:8]).info.run_id == far  # in any experiment
    with pytest.raises(RunNotFound) as info:
        find_run(client, run[:5])  # too short for a prefix: looked up as a whole id
    assert "unique prefix of 6 or more hex digits" in one_line(info)
    unused = next(p for p in ("abcdef", "fedcba", "012345") if not (run + far).startswith(p))
    with pytest.raises(RunNotFound, match=f"run '{unused}' not found"):
        find_run(client, unused)
    # resume=PREFIX (and predict/evaluate --run, through the same function)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"tracking": {"uri": None}})
    assert checkpoint_dir_of_run(cfg, run[:8]) == workdir / "ckpt"
    with pytest.raises(TrackingError) as info:
        checkpoint_dir_of_run(cfg, unused, name=f"--run {unused!r}", option=CLI_OPTION)
    assert one_line(info).startswith(f"--run '{unused}' is neither a checkpoint file")


def test_an_ambiguous_prefix_lists_the_matches_on_one_line() -> None:
    runs = [
        SimpleNamespace(info=SimpleNamespace(run_id=f"abcdef{n}" + "0" * 25, run_name=f"r{n}"))
        for n in (1, 2)
    ]
    client = SimpleNamespace(
        tracking_uri="sqlite:///x.db",
        search_experiments=lambda **_: _Page([SimpleNamespace(experiment_id="1")]),
        search_runs=lambda *args, **kwargs: runs,
    )
    with pytest.raises(TrackingError) as info:
        find_run(client, "abcdef")
    message = one_line(info)
    assert "run 'abcdef' is ambiguous: 2 runs start with it" in message
    assert all(f"{r.info.run_id} ({r.info.run_name})" in message for r in runs)


class _Page(list):
    """A page of search results as MlflowClient returns them (a list with a next-page token)."""

    token = None


# ------------------------------------------------------------------------------------- the tools, end to end


def run_tool(
    tool: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run(
        [str(exe), *args], cwd=cwd, capture_output=True, text=True, env={**base, **(env or {})}, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


def tiny_trial(synthetic_cache: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"data.cache_dir={synthetic_cache}", "device=cpu"]


@pytest.mark.parametrize("kind", ["not-mlflow", "missing-dir"])
def test_bad_stores_fail_each_tool_with_its_own_option(
    workdir: Path, synthetic_cache: Path, kind: str
) -> None:
    with web_server(404) as url:
        uri = url if kind == "not-mlflow" else f"sqlite:///{workdir}/no-such-dir/x.db"
        needle = "not an MLflow tracking server" if kind == "not-mlflow" else "does not exist"
        train = run_tool("masksweep-train", *tiny_trial(synthetic_cache), f"tracking.uri={uri}", cwd=workdir)
        assert_one_line_error(train, f"tracking.uri='{uri}'", needle)
        compare = run_tool("masksweep", "compare", "--no-chart", "--tracking-uri", uri, cwd=workdir)
        assert_one_line_error(compare, f"--tracking-uri '{uri}'", needle)
        assert "tracking.uri" not in compare.stderr
    assert not (workdir / "no-such-dir").exists() and not (workdir / "mlruns").exists()  # no run recorded


@pytest.mark.slow
def test_mlflow_tracking_uri_alone_routes_a_trial_and_compare(workdir: Path, synthetic_cache: Path) -> None:
    (workdir / "team").mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'team' / 'mlflow.db'}"}
    train = run_tool(
        "masksweep-train", *tiny_trial(synthetic_cache), "trial_name=routed", cwd=workdir, env=env
    )
    assert train.returncode == 0, train.stderr
    assert not (workdir / "mlruns" / "mlflow.db").exists()  # nothing went to the embedded store
    compare = run_tool("masksweep", "compare", "--format", "csv", "--no-chart", cwd=workdir, env=env)
    assert compare.returncode == 0, compare.stderr
    assert compare.stdout.splitlines()[1].startswith("routed,")
    # --tracking-uri overrides the variable
    elsewhere = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'nowhere' / 'mlflow.db'}"}
    uri = env["MLFLOW_TRACKING_URI"]
    compare = run_tool(
        "masksweep",
        "compare",
        "--format",
        "csv",
        "--no-chart",
        "--tracking-uri",
        uri,
        cwd=workdir,
        env=elsewhere,
    )
    assert compare.returncode == 0 and "routed," in compare.stdout, compare.stderr
    compare = run_tool("masksweep", "compare", "--no-chart", cwd=workdir, env=elsewhere)
    assert_one_line_error(compare, "MLFLOW_TRACKING_URI=", "does not exist")
