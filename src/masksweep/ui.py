"""`masksweep ui`: the MLflow UI (`mlflow server`) on the embedded store, bound to loopback by default."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from masksweep.errors import TrackingError
from masksweep.tracking.store import (
    CLI_OPTION,
    check_store,
    default_store,
    redact_uri,
    resolve_uri,
    setting_text,
    sqlite_path,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT = 120.0


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` (OSError for a host that does not resolve)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socket.getaddrinfo(host, port, family)  # raises for an unknown host
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(uri: str, host: str, port: int, artifact_root: str | None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifact_root is not None:
        command += ["--default-artifact-root", artifact_root]
    return command


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(
                f"mlflow server exited with status {proc.returncode} before serving {url} "
                "(its output is above)"
            )
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise TrackingError(f"mlflow server did not answer on {url} within {timeout:.0f}s")


def _experiment_fragment(uri: str, name: str) -> str:
    """`#/experiments/<id>` of the masksweep experiment, when the store has it (read straight from SQLite,
    so printing the URL does not wait for mlflow to import)."""
    import sqlite3

    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return ""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            query = "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'"
            row = con.execute(query, (name,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return ""
    return f"/#/experiments/{row[0]}/runs" if row else ""


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
        return None


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (it runs in its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    experiment: str = "masksweep",
    out=None,
    err=None,
) -> int:
    """Run the UI until Ctrl-C (or SIGTERM). Prints the URL (on stdout) once it answers."""
    out, err = out or sys.stdout, err or sys.stderr
    tracking_uri, setting = resolve_uri(tracking_uri, CLI_OPTION)  # $MLFLOW_TRACKING_URI when not given
    if tracking_uri is not None and tracking_uri.startswith(("http://", "https://")):
        raise TrackingError(
            f"{setting_text(setting, tracking_uri)} is already an MLflow server: open it in a browser "
            "(masksweep ui serves a database or the embedded store)"
        )
    if tracking_uri is not None:
        check_store(tracking_uri, CLI_OPTION)
    if not (1 <= port <= 65535):
        raise TrackingError(f"--port {port} is invalid; allowed: 1-65535")
    try:
        free = port_free(host, port)
    except OSError as exc:  # e.g. an unknown host name
        raise TrackingError(f"--host {host!r} cannot be bound ({exc})") from exc
    if not free:
        raise TrackingError(f"port {port} on {host} is in use; pick another with --port")
    if host not in LOOPBACK:
        print(
            f"masksweep ui: warning: --host {host} exposes the UI (no authentication) beyond this machine",
            file=err,
        )
    artifact_root = None
    if tracking_uri is None:
        tracking_uri, artifact_root = default_store(create=True)
        db = sqlite_path(tracking_uri)
        if db is not None and not db.is_file():
            print(
                f"masksweep ui: note: no runs yet in {Path(db).parent} (run masksweep-train first)", file=err
            )
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}"
    # No GenAI job runner (huey consumers): training runs do not use it, and it is 7 more processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The server's own chatter goes to stderr: stdout carries only the URL line.
    proc = subprocess.Popen(
        server_command(tracking_uri, host, port, artifact_root),
        start_new_session=True,
        env=env,
        stdout=_stderr_fd(),
    )

    def on_sigterm(signum, frame):  # `kill <pid>` of masksweep ui stops the server too
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        wait_until_up(url, proc)
        fragment = _experiment_fragment(tracking_uri, experiment)
        print(
            f"MLflow UI for {redact_uri(tracking_uri)}: {url}{fragment}  (Ctrl-C to stop)",
            file=out,
            flush=True,
        )
        return proc.wait() or 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(proc)
        signal.signal(signal.SIGTERM, previous)
