"""MLflow run lifecycle: one run per trial, nested under a parent run per multirun.

Everything goes through `MlflowClient` (no fluent global state), so a sweeper process and its trials never
share an "active run" by accident, and metrics go out in batches (`log_batch`) rather than one call each.

The embedded store is SQLite (`./mlruns/mlflow.db`, artifacts under `./mlruns/artifacts`). Parallel sweep
workers write to it from several processes, so the database is switched to WAL mode once, its first
initialisation is serialised by a file lock, and every client call retries while SQLite says
"database is locked".
mlflow itself is imported lazily: `import masksweep.train` and `masksweep --help` stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import random
import re
import socket
import sqlite3
import subprocess
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import masksweep
from masksweep.errors import MasksweepError, TrackingError, TrialStopped

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_RESULTS_FILE = "optimization_results.yaml"
STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
# Config keys that may hold credentials (database URLs) or are machine-local plumbing: never logged as params.
PRIVATE_KEYS = ("optuna.storage", "tracking.uri")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
MAX_TAG_LENGTH = 5000
LOCK_RETRY_SECONDS = 120.0  # how long a call keeps retrying on a locked SQLite database

# Tag names shared with `masksweep compare` / `reproduce`.
TAG_TRIAL_NAME = "masksweep.trial_name"
TAG_ROLE = "masksweep.role"  # "sweep" on a multirun's parent run
TAG_REPRODUCED_FROM = "masksweep.reproduced_from"
TAG_ERROR = "error"
TAG_CHECKPOINT_DIR = "masksweep.checkpoint_dir"  # set by train()
STOP_TAGS = ("stop.kind", "stop.reason", "stop.step", "stop.value")

_EXTRA_TAGS: ContextVar[Mapping[str, str] | None] = ContextVar("masksweep_extra_run_tags", default=None)
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------- the store


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
def _file_lock(path: Path) -> Iterator[None]:
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


def _sqlite_path(uri: str) -> Path | None:
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
    db_path = _sqlite_path(uri)
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
            with _file_lock(db_path.parent / f".{db_path.name}.lock"):
                client = call_with_retries(MlflowClient, tracking_uri=uri)
                _enable_wal(db_path)
        else:
            client = MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise TrackingError(f"tracking.uri={shown!r}: {_first_line(exc)}") from exc
    except OSError as exc:
        raise TrackingError(f"tracking.uri={shown!r}: {exc}") from exc
    return RetryingClient(client), artifact_location


def _first_line(exc: BaseException) -> str:
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


# -------------------------------------------------------------------------------------------- what is logged


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}, without the private keys."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in PRIVATE_KEYS:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The run's params that come from the config: the flattened resolved config, private keys left out."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(masksweep.__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, str]:
    """Code and library versions for the run's params (never the environment: it may hold secrets)."""
    import torch
    import torchvision

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)),
        "version.masksweep": masksweep.__version__,
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
    }


def sweep_dir() -> Path | None:
    """The multirun's sweep directory when this process runs a Hydra multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).absolute() if hydra_cfg.mode == RunMode.MULTIRUN else None


def _hydra_job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    if sweep_dir() is None:
        return None
    return OmegaConf.select(HydraConfig.get(), "job.num", default=None)


def hydra_output_dir() -> Path | None:
    """The job's `.hydra` folder, when Hydra wrote one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    return Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir)


def redacted_config(cfg: DictConfig) -> DictConfig:
    """The resolved config with the passwords of the private keys' URLs masked (the logged config.yaml)."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PRIVATE_KEYS:
        value = OmegaConf.select(resolved, key, default=None)
        if isinstance(value, str):
            OmegaConf.update(resolved, key, redact_uri(value), merge=False)
    return resolved


def redacted_hydra_dir(src: Path, dst: Path) -> Path:
    """A copy of a `.hydra` folder without secrets: URL passwords masked (overrides carry optuna.storage,
    hydra.yaml the sweeper's storage) and the values of `hydra.job.env_set` blanked."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        text = redact_uri(path.read_text(errors="replace"))
        target = dst / path.name
        target.write_text(text)
        if path.name == "hydra.yaml":
            with contextlib.suppress(Exception):  # not a Hydra file after all: the URL masking still applies
                hydra_yaml = OmegaConf.load(target)
                env_set = OmegaConf.select(hydra_yaml, "hydra.job.env_set", default=None)
                if env_set:
                    for name in list(env_set):
                        env_set[name] = "<redacted>"
                    OmegaConf.save(hydra_yaml, target)
    return dst


# ----------------------------------------------------------------------------------------------- the tracker


@contextmanager
def extra_run_tags(tags: Mapping[str, str]) -> Iterator[None]:
    """Tags for the runs started inside the block (e.g. `masksweep.reproduced_from`)."""
    token = _EXTRA_TAGS.set({**(_EXTRA_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


def stop_tags(stop: TrialStopped) -> dict[str, str]:
    """The KILLED run's tags for a stopped trial (any TrialStopped subclass: kind, reason, step, value)."""
    return {
        "stop.kind": str(stop.kind),
        "stop.reason": str(stop.reason)[:MAX_TAG_LENGTH],
        "stop.step": str(stop.step),
        "stop.detected_at": str(stop.detected_at),
        "stop.value": repr(stop.value),
    }


class Tracker:
    """Records one trial. The base class records nothing: it is the tracker for `tracking=none`."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str, tags: Mapping[str, str] | None = None) -> None: ...
    def fail_abandoned(self, study_name: str, trial_number: int, retried_as: int) -> None: ...

    @contextmanager
    def recording(self) -> Iterator[Tracker]:
        """End the run FINISHED, KILLED (a stopped trial, with its reason) or FAILED (with the error).

        The exception always propagates; a tracking failure while recording it is logged, not raised over it.
        """
        try:
            yield self
        except TrialStopped as stop:
            self._finish_quietly("KILLED", stop_tags(stop))
            raise
        except KeyboardInterrupt:
            self._finish_quietly("KILLED", {"stop.kind": "interrupted", "stop.reason": "KeyboardInterrupt"})
            raise
        except BaseException as exc:
            self._record_error(exc)
            message = redact_uri(f"{type(exc).__name__}: {exc}")  # e.g. a storage URL in a connection error
            self._finish_quietly("FAILED", {TAG_ERROR: message[:MAX_TAG_LENGTH]})
            raise
        self.finish("FINISHED")

    def _record_error(self, exc: BaseException) -> None:
        """The traceback as an `error.txt` artifact (the tag holds one line)."""
        if self.run_id is None:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "error.txt"
                path.write_text(redact_uri("".join(traceback.format_exception(exc))))
                self.log_artifact(path)
        except Exception as log_exc:  # the run's status matters more than the traceback
            log.warning("could not log the traceback of run %s: %s", self.run_id, log_exc)

    def _finish_quietly(self, status: str, tags: Mapping[str, str]) -> None:
        try:
            self.finish(status, tags)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, _first_line(exc))


class MLflowTracker(Tracker):
    def __init__(self, client: RetryingClient, run_id: str, flush_every: int = 50) -> None:
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._pending: list = []

    @classmethod
    def start(cls, cfg: DictConfig) -> MLflowTracker:
        from mlflow.utils.mlflow_tags import (
            MLFLOW_GIT_COMMIT,
            MLFLOW_PARENT_RUN_ID,
            MLFLOW_SOURCE_NAME,
            MLFLOW_SOURCE_TYPE,
        )

        name = cfg.tracking.experiment_name
        if not name:
            raise TrackingError(f"tracking.experiment_name={name!r} is invalid; allowed: a non-empty name")
        client, artifact_location = open_client(cfg.tracking.uri)
        exp_id = experiment_id(client, str(name), artifact_location)
        tags = {MLFLOW_SOURCE_NAME: "masksweep-train", MLFLOW_SOURCE_TYPE: "LOCAL"}
        commit = _git("rev-parse", "HEAD")
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        if cfg.trial_name:
            tags[TAG_TRIAL_NAME] = str(cfg.trial_name)
        if cfg.optuna.trial_number is not None:
            tags.update(
                {
                    "optuna.study_name": str(cfg.optuna.study_name),
                    "optuna.trial_number": str(cfg.optuna.trial_number),
                }
            )
        job_num = _hydra_job_num()
        if job_num is not None:
            tags["masksweep.job_num"] = str(job_num)
        sweep = sweep_dir()
        if sweep is not None and (sweep / PARENT_RUN_FILE).is_file():
            tags[MLFLOW_PARENT_RUN_ID] = (sweep / PARENT_RUN_FILE).read_text().strip()
        tags.update(_EXTRA_TAGS.get() or {})
        if cfg.trial_name:
            run_name = str(cfg.trial_name)
        elif cfg.optuna.trial_number is not None:
            run_name = f"trial-{cfg.optuna.trial_number}"
        elif job_num is not None:
            run_name = f"job-{job_num}"
        else:
            run_name = _random_run_name()
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:  # log_batch takes at most 1000 metrics per call
            batch = self._pending[:1000]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[: len(batch)]

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            items = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        try:
            self.flush()  # the completed epochs' metrics are recorded whatever the outcome
        finally:
            try:
                self.set_tags(tags or {})
            finally:
                self.client.set_terminated(self.run_id, status)

    def fail_abandoned(self, study_name: str, trial_number: int, retried_as: int) -> None:
        """End FAILED the runs a killed worker left RUNNING for `trial_number` (found by Optuna tags)."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        query = (
            f"tags.`optuna.study_name` = '{study_name}' and tags.`optuna.trial_number` = '{trial_number}' "
            "and attributes.status = 'RUNNING'"
        )
        for run in self.client.search_runs([experiment], query):
            self.client.set_tag(
                run.info.run_id,
                TAG_ERROR,
                f"its worker died; trial {trial_number} was retried as trial {retried_as}",
            )
            self.client.set_terminated(run.info.run_id, "FAILED")


def _random_run_name() -> str:
    """An MLflow-style name ("bright-owl-123") drawn without touching the seeded global `random` state.

    MLflow's own default name draws from it: every run of a seed would get the same name, and the trial's
    random stream would shift with tracking on or off."""
    from mlflow.utils.name_utils import _generate_random_name

    state = random.getstate()
    try:
        random.seed()  # from OS entropy
        return _generate_random_name()
    except Exception:
        return f"run-{os.urandom(4).hex()}"
    finally:
        random.setstate(state)


def checkpoint_dir_of_run(cfg: DictConfig, run_id: str) -> Path:
    """The checkpoint directory a logged run recorded (tag masksweep.checkpoint_dir), for `resume=RUN_ID`."""
    from mlflow.exceptions import MlflowException

    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    what = f"resume={run_id!r} is neither a checkpoint file, a run directory nor an MLflow run"
    try:
        client, _ = open_client(uri, create=False)
    except TrackingError as exc:
        raise TrackingError(f"{what} ({exc})") from exc
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"{what} in {redact_uri(client.tracking_uri)}") from exc
    directory = run.data.tags.get(TAG_CHECKPOINT_DIR)
    if not directory:
        raise TrackingError(
            f"resume={run_id!r}: the MLflow run recorded no checkpoint directory (tag {TAG_CHECKPOINT_DIR})"
        )
    return Path(directory)


def start_tracker(cfg: DictConfig) -> Tracker:
    return MLflowTracker.start(cfg) if cfg.tracking.enabled else Tracker()


def log_run_inputs(tracker: Tracker, cfg: DictConfig, extra_params: Mapping[str, str]) -> None:
    """Params (flattened resolved config + provenance) and the config itself (secrets masked) as artifacts."""
    if tracker.run_id is None:
        return
    tracker.log_params({**config_params(cfg), **provenance(), **extra_params})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        OmegaConf.save(redacted_config(cfg), path)
        tracker.log_artifact(path)
        hydra_dir = hydra_output_dir()
        if hydra_dir is not None and hydra_dir.is_dir():
            tracker.log_artifact(redacted_hydra_dir(hydra_dir, Path(tmp) / ".hydra"), ".hydra")


# ---------------------------------------------------------------------------------------- the sweep's parent


class SweepRunCallback(Callback):
    """Hydra callback: a multirun is an MLflow parent run; its trials find it through a file in the sweep dir.

    A sweep that dies before Hydra's `on_multirun_end` leaves its parent FAILED, not RUNNING (an exit hook).
    """

    def __init__(self) -> None:
        self.client: RetryingClient | None = None
        self.run_id: str | None = None
        self._pid = os.getpid()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not OmegaConf.select(config, "tracking.enabled", default=False):
            return
        try:
            self._start(config)
        except MasksweepError as exc:
            # Hydra would print a traceback for an error in a callback; the user gets the one line.
            import sys

            print(f"masksweep-train: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    def _start(self, config: DictConfig) -> None:
        self.client, artifact_location = open_client(config.tracking.uri)
        exp_id = experiment_id(self.client, config.tracking.experiment_name, artifact_location)
        sweep = Path(config.hydra.sweep.dir).absolute()
        study = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
        db_path = _sqlite_path(self.client.tracking_uri)
        # Workers started together on one study must find one parent, not each create their own: on the
        # embedded store a file lock makes find-or-create atomic.
        with _file_lock(db_path.parent / ".sweep-parent.lock") if db_path else contextlib.nullcontext():
            self._find_or_create_parent(config, exp_id, sweep, study)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / PARENT_RUN_FILE).write_text(self.run_id)
        atexit.register(self._end_unfinished)

    def _find_or_create_parent(self, config: DictConfig, exp_id: str, sweep: Path, study: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

        assert self.client is not None
        self.run_id = self._resumable_parent(exp_id, study) if study else None
        if self.run_id is None:
            tags = {
                "masksweep.sweep_dir": str(sweep),
                TAG_ROLE: "sweep",
                MLFLOW_SOURCE_NAME: "masksweep-train -m",
            }
            if study:
                tags["optuna.study_name"] = str(study)
            run = self.client.create_run(exp_id, run_name=f"sweep-{study or sweep.name}", tags=tags)
            self.run_id = run.info.run_id
            overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
            self.client.log_batch(
                self.run_id,
                params=[
                    Param("sweep.overrides", redact_uri(" ".join(map(str, overrides)))[:MAX_PARAM_LENGTH]),
                    Param("optimized_metric", str(OmegaConf.select(config, "optimized_metric", default=""))),
                ],
            )
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _resumable_parent(self, exp_id: str, study: str) -> str | None:
        # Re-running an Optuna sweep continues its study, so it continues the same parent run too.
        assert self.client is not None
        quoted = str(study).replace("\\", "\\\\").replace("'", "\\'")
        runs = self.client.search_runs(
            [exp_id],
            f"tags.`optuna.study_name` = '{quoted}' and tags.`{TAG_ROLE}` = 'sweep'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        sweep = Path(config.hydra.sweep.dir).absolute()
        try:
            results = sweep / SWEEP_RESULTS_FILE
            if results.is_file():
                summary = OmegaConf.to_container(OmegaConf.load(results), resolve=True)
                numbers = {k: v for k, v in flatten(summary).items() if _is_number(v)}
                metrics = [_metric(k, float(v)) for k, v in numbers.items()]
                for i in range(0, len(metrics), 1000):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
                study = summary.get("study_name") if isinstance(summary, dict) else None
                if study:
                    self.client.set_tag(self.run_id, "optuna.study_name", str(study))
                with tempfile.TemporaryDirectory() as tmp:  # its `storage:` may be a URL with a password
                    copy = Path(tmp) / results.name
                    copy.write_text(redact_uri(results.read_text()))
                    self.client.log_artifact(self.run_id, str(copy))
            for plot in sorted(sweep.glob("*.png")) + sorted(sweep.glob("*.html")):
                self.client.log_artifact(self.run_id, str(plot), "plots")
        except Exception as exc:  # the trials are recorded; a failing summary must not fail the sweep
            log.warning("could not log the sweep summary to MLflow run %s: %s", self.run_id, _first_line(exc))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def _end_unfinished(self) -> None:
        if self.run_id is None or self.client is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, TAG_ERROR, "the sweep ended before Hydra's on_multirun_end")
            self.client.set_terminated(self.run_id, "FAILED")
        self.run_id = None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return value not in ("True", "False")


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)
