"""The MLflow store: the embedded SQLite default, reachability checks, and a client that retries on locks.

The embedded store is SQLite (`./mlruns/mlflow.db`, artifacts under `./mlruns/artifacts`). Parallel sweep
workers write to it from several processes, so the database is switched to WAL mode once, its first
initialisation is serialised by a file lock, and every client call retries while SQLite says
"database is locked".
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from masksweep.errors import TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
LOCK_RETRY_SECONDS = 120.0  # how long a call keeps retrying on a locked SQLite database
_T = TypeVar("_T")


TRAIN_OPTION = "tracking.uri"  # how masksweep-train takes the store (a Hydra override)
CLI_OPTION = "--tracking-uri"  # how every `masksweep` command takes it
ENV_VAR = "MLFLOW_TRACKING_URI"  # what every MLflow tool reads when neither is given


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


def resolve_uri(uri: str | None, option: str = TRAIN_OPTION) -> tuple[str | None, str]:
    """(the URI to open, the setting it came from): the option, else $MLFLOW_TRACKING_URI as MLflow's own
    tools read it, else (None, option) for the embedded store."""
    if uri:
        return str(uri), option
    from_env = os.environ.get(ENV_VAR, "").strip()
    return (from_env, ENV_VAR) if from_env else (None, option)


def setting_text(setting: str, uri: str) -> str:
    """How the user gave the URI, in their tool's syntax: `tracking.uri='...'` or `--tracking-uri '...'`."""
    shown = redact_uri(uri)
    return f"{setting} {shown!r}" if setting.startswith("-") else f"{setting}={shown!r}"


def _allowed(setting: str, option: str) -> str:
    embedded = (
        f"no {CLI_OPTION} for the embedded store ./mlruns"
        if option == CLI_OPTION
        else f"{TRAIN_OPTION}=null for the embedded store ./mlruns, or tracking=none"
    )
    if setting == ENV_VAR:
        embedded = f"unset {ENV_VAR} ({option} overrides it), or {embedded}"
    return (
        "allowed: a running MLflow server (http://HOST:PORT), a database URL (sqlite:///FILE in an existing "
        f"directory, postgresql://...), {embedded}"
    )


DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
# A read-only REST call every MLflow server answers with JSON: a web server that is not MLflow fails it.
PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


def check_reachable(
    uri: str, timeout: float = 5.0, option: str = TRAIN_OPTION, setting: str | None = None
) -> None:
    """Fail fast on an unreachable tracking server or database (MLflow's own client retries for minutes), and
    on a web server that is not MLflow. `setting` is where the URI came from (default: `option`)."""
    setting = setting or option
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    named = setting_text(setting, uri)
    if scheme in ("http", "https"):
        # Without the user:password part (urllib cannot use it, and it must not reach a log).
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        probe = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")) + PROBE_PATH
        try:
            with urllib.request.urlopen(probe, timeout=timeout) as response:
                body = response.read(1 << 16)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 407):
                return  # up, behind authentication: MLflow's client sends the credentials and reports them
            raise TrackingError(
                f"{named} is not an MLflow tracking server (HTTP {exc.code} {exc.reason} for its REST API); "
                + _allowed(setting, option)
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"{named} is unreachable ({reason}); " + _allowed(setting, option)) from exc
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise TrackingError(
                f"{named} is not an MLflow tracking server (its REST API answered with no JSON); "
                + _allowed(setting, option)
            )
    elif scheme in DB_PORTS:
        try:
            host, port = parts.hostname or "localhost", parts.port or DB_PORTS[scheme]
        except ValueError as exc:
            raise TrackingError(
                f"{named} is not a valid database URL ({exc}); " + _allowed(setting, option)
            ) from exc
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            raise TrackingError(f"{named} is unreachable ({exc}); " + _allowed(setting, option)) from exc


def check_store(uri: str | None, option: str = TRAIN_OPTION, create: bool = True) -> str | None:
    """Check the store before any work, and return the URI to open (None: the embedded store).

    `uri` is the user's option (`tracking.uri` for masksweep-train, `--tracking-uri` for `masksweep`; named
    by `option` in the messages), else $MLFLOW_TRACKING_URI. A server or database must answer; a SQLite file
    must lie in an existing directory (MLflow would create the directories, even at the filesystem root);
    with `create=False` (the commands that only read) the file must exist. The embedded store's directory is
    created by `default_store`. Raises TrackingError with one line naming the setting and what is allowed.
    """
    resolved, setting = resolve_uri(uri, option)
    if resolved is None:
        if not create:
            store = Path.cwd().absolute() / STORE_DIR / DB_FILE
            if not store.is_file():
                raise TrackingError(
                    f"no MLflow store at {store}; allowed: a directory where masksweep-train ran, "
                    f"{CLI_OPTION} URI, or {ENV_VAR}"
                )
        return None
    db_path = sqlite_path(resolved)
    if db_path is not None:
        if not db_path.parent.is_dir():
            raise TrackingError(
                f"{setting_text(setting, resolved)}: the directory {db_path.parent.absolute()} does not "
                "exist (create it first); " + _allowed(setting, option)
            )
        if not create and not db_path.is_file():
            raise TrackingError(
                f"{setting_text(setting, resolved)}: no MLflow store at {db_path.absolute()}; allowed: the "
                "database masksweep-train logged to"
            )
        return resolved
    check_reachable(resolved, option=option, setting=setting)
    return resolved


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
        if name == "_client":  # unpickling (process launchers) looks attributes up before __init__ ran
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(call_with_retries, attr)


HISTORY_CHUNK = 200  # run ids per bulk history query (well under SQLite's bound-parameter limit)


def metric_histories(client: RetryingClient, run_ids: Sequence[str], key: str) -> dict[str, list[Metric]]:
    """Every value of metric `key` logged by each run, sorted by step.

    MlflowClient reads one run's history per call: for a chart of 500 trials that is 500 round trips. A SQL
    store (SQLite, PostgreSQL, MySQL) answers all of them in one query (`get_metric_history_bulk`, what the
    MLflow server's own bulk endpoint uses), so that is used when the store has it; a server is asked once
    per run, concurrently.
    """
    ids = list(dict.fromkeys(run_ids))
    histories: dict[str, list[Metric]] = {run_id: [] for run_id in ids}
    mlflow_client = getattr(client, "_client", client)  # under the retrying wrapper
    store = getattr(getattr(mlflow_client, "_tracking_client", None), "store", None)
    if hasattr(store, "get_metric_history_bulk"):
        for i in range(0, len(ids), HISTORY_CHUNK):
            chunk = ids[i : i + HISTORY_CHUNK]
            for item in call_with_retries(store.get_metric_history_bulk, chunk, key, 2**62):
                histories[item.run_id].append(item)  # a Metric with its run id
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            fetched = pool.map(lambda run_id: client.get_metric_history(run_id, key), ids)
            histories.update(zip(ids, map(list, fetched), strict=True))
    for history in histories.values():
        history.sort(key=lambda m: (m.step, m.timestamp))
    return histories


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


def open_client(
    uri: str | None = None, create: bool = True, option: str = TRAIN_OPTION
) -> tuple[RetryingClient, str | None]:
    """A client on `uri` (None: $MLFLOW_TRACKING_URI, else the embedded store of the current directory) and
    the artifact location for new experiments (None = the server's default). With `create=False` a missing
    store is an error instead of a new empty database. `option` names the user's setting in errors
    (`check_store`)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _quiet_mlflow_logs()
    artifact_location = None
    resolved = check_store(uri, option, create)
    setting = resolve_uri(uri, option)[1]
    if resolved is None:
        resolved, artifact_location = default_store(create=create)
    db_path = sqlite_path(resolved)
    try:
        if db_path is not None:
            # The first client creates the tables; two processes doing that at once trip over each other.
            with file_lock(db_path.parent / f".{db_path.name}.lock"):
                client = call_with_retries(MlflowClient, tracking_uri=resolved)
                _enable_wal(db_path)
        else:
            client = MlflowClient(tracking_uri=resolved)
    except MlflowException as exc:
        raise TrackingError(f"{setting_text(setting, resolved)}: {first_line(exc)}") from exc
    except OSError as exc:
        raise TrackingError(f"{setting_text(setting, resolved)}: {exc}") from exc
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
