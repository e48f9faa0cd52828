"""The MLflow store: the embedded SQLite default, reachability checks, and a client that retries on locks.

The embedded store is SQLite (`./mlruns/mlflow.db`, artifacts under `./mlruns/artifacts`). Parallel sweep
workers write to it from several processes, so the database is switched to WAL mode once, its first
initialisation is serialised by a file lock, and every client call retries while SQLite says
"database is locked".
"""

from __future__ import annotations

import functools
import logging
import random
import re
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from masksweep.errors import TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
LOCK_RETRY_SECONDS = 120.0  # how long a call keeps retrying on a locked SQLite database
_T = TypeVar("_T")


def default_store(root: Path | None = None, create: bool = True) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under ./mlruns of the launch directory."""
    store = (root or Path.cwd()).absolute() / STORE_DIR
    if create:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store directory {store}: {exc}") from exc
    return f"sqlite:///{store / DB_FILE}", (store / "artifacts").as_uri()


def redact_uri(text: str) -> str:
    """Mask the password of every `scheme://user:password@host` in `text`."""
    return re.sub(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s'\"]*):[^@/\s'\"]*@", r"\1:***@", text)


DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server or database (MLflow's own client retries for minutes)."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    shown = redact_uri(uri)
    if scheme in ("http", "https"):
        # Without the user:password part (urllib cannot use it, and it must not reach a log).
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        probe = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:
            urllib.request.urlopen(probe, timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered (maybe 401/404 behind a proxy): reachable; MLflow reports auth errors itself
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"tracking.uri={shown!r} is unreachable ({reason}); allowed: a running "
                "MLflow server, null for the embedded store, or tracking=none"
            ) from exc
    elif scheme in DB_PORTS:
        try:
            host, port = parts.hostname or "localhost", parts.port or DB_PORTS[scheme]
        except ValueError as exc:
            raise TrackingError(f"tracking.uri={shown!r} is not a valid database URL ({exc})") from exc
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            raise TrackingError(
                f"tracking.uri={shown!r} is unreachable ({exc}); allowed: a running database "
                "or MLflow server, null for the embedded store, or tracking=none"
            ) from exc


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "database is busy" in text


def call_with_retries(
    fn: Callable[..., _T], *args: Any, deadline: float = LOCK_RETRY_SECONDS, **kwargs: Any
) -> _T:
    """Call `fn`, retrying with jittered exponential back-off while SQLite reports a lock."""
    delay, start = 0.05, time.monotonic()
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_locked(exc) or time.monotonic() - start > deadline:
                raise
            log.debug("MLflow store locked; retrying %s in %.2fs", getattr(fn, "__name__", fn), delay)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


class RetryingClient:
    """An `MlflowClient` whose calls retry while the SQLite database is locked by another process.

    A retried call is safe: MLflow runs each call in one transaction, rolled back when the lock error comes.
    """

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(call_with_retries, attr)


class _DropLockNoise(logging.Filter):
    """MLflow logs a traceback for every 'database is locked'; the retry loop handles (or re-raises) them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_locked(record.getMessage() if record.args else str(record.msg))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the retries still apply
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def _enable_wal(db_path: Path) -> None:
    """WAL lets readers (the UI, `compare`) and one writer work at once; the mode is stored in the file."""
    try:
        con = sqlite3.connect(db_path, timeout=30)
    except sqlite3.Error:
        return
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:  # another process holds it: the next one will switch it
        log.debug("could not switch %s to WAL: %s", db_path, exc)
    finally:
        con.close()


_quiet = False


def _quiet_mlflow_logs() -> None:
    global _quiet
    if _quiet:
        return
    _quiet = True
    db_logger = logging.getLogger("mlflow.store.db.utils")
    db_logger.addFilter(_DropLockNoise())
    db_logger.setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." on a fresh store
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the schema migrations of a fresh database


def open_client(uri: str | None = None, create: bool = True) -> tuple[RetryingClient, str | None]:
    """A client on `uri` (None = the embedded store of the current directory) and the artifact location
    for new experiments (None = the server's default). With `create=False` a missing embedded store is an
    error instead of a new empty database."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _quiet_mlflow_logs()
    artifact_location = None
    if uri is None:
        uri, artifact_location = default_store(create=create)
    db_path = sqlite_path(uri)
    shown = redact_uri(uri)
    if db_path is not None and not create and not db_path.is_file():
        raise TrackingError(
            f"no MLflow store at {db_path} (run masksweep-train here first, or pass --tracking-uri)"
        )
    check_reachable(uri)
    try:
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            # The first client creates the tables; two processes doing that at once trip over each other.
            with file_lock(db_path.parent / f".{db_path.name}.lock"):
                client = call_with_retries(MlflowClient, tracking_uri=uri)
                _enable_wal(db_path)
        else:
            client = MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise TrackingError(f"tracking.uri={shown!r}: {first_line(exc)}") from exc
    except OSError as exc:
        raise TrackingError(f"tracking.uri={shown!r}: {exc}") from exc
    return RetryingClient(client), artifact_location


def first_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return redact_uri(lines[0] if lines else type(exc).__name__)


def experiment_id(client: RetryingClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"tracking.experiment_name={name!r} is a deleted MLflow experiment; restore "
                "it (mlflow experiments restore) or pick another name"
            )
        return experiment.experiment_id
    try:
        # The kind makes MLflow 3's UI open the experiment on its runs (not on the GenAI overview).
        return client.create_experiment(
            name,
            artifact_location=artifact_location,
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except MlflowException:  # another worker created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id

