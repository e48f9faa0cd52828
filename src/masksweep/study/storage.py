"""Storages, the cross-process ask lock, pruners and attribute names: shared by the sweeper plugin and the
trials (`masksweep.study.reporter`).

Every trial imports this module, so it imports nothing heavy at module level: optuna and SQLAlchemy are
imported inside the functions that need them.

Storage forms (`hydra.sweeper.storage`, and what travels to each job as `optuna.storage`):
  null                       journal file <launch dir>/mlruns/optuna/<study_name>.journal
  journal:///abs/x.journal   journal file at an absolute path
  journal://rel/x.journal    journal file relative to the launch directory (also `journal:rel/x.journal`)
  some/path.journal          the same, written as a plain path
  sqlite:///file.db          SQLite through Optuna's RDBStorage (fine for one worker; see below)
  postgresql://u:p@host/db   any other SQLAlchemy URL: RDBStorage, for workers on several machines
Jobs always receive an absolute form (`journal:///...`, `sqlite:////...`), so a job that changes directory
(hydra.job.chdir) or runs in another process still finds the same study.

Why a journal file is the default: Optuna's docs recommend JournalStorage with JournalFileBackend for several
processes on one host. It appends one JSON line per operation under a lock file, so parallel workers never hit
SQLite's 'database is locked', and it needs no server. SQLite is not recommended for parallel workers; a
PostgreSQL server (RDBStorage) is the choice when workers run on several machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# Attribute keys. System attrs hold the sweeper's own bookkeeping; user attrs hold what a person reads.
PRUNER_ATTR = (
    "masksweep:pruner"  # study: {"name", "kwargs"}, so each job's TrialReporter builds the same pruner
)
WORKERS_ATTR = "masksweep:workers_started"  # study: how many sweeper processes joined (seed offsets)
WORKER_ATTR = (
    "masksweep:worker"  # trial: the sweeper process that runs it {"host", "pid", "boot", "pidns", "id"}
)
HEARTBEAT_ATTR = "masksweep:heartbeat"  # trial: unix time of its worker's last beat (journal storages)
STALE_ATTR = "masksweep:stale"  # trial: why it was failed and retried ("stale: ...", "interrupted: ...", ...)
SURPLUS_ATTR = "masksweep:surplus"  # trial: asked past the budget by a race (only on storages without a lock)
JOB_ATTR = "masksweep:job"  # trial: the scheduler job that runs it (masksweep.study.jobs), for adoption
# The keys Optuna's RetryHeartbeatStaleTrialCallback uses, so its helpers read our retries too.
RETRY_FROM_ATTR = "failed_trial"
RETRY_HISTORY_ATTR = "retry_history"

StorageKind = Literal["journal", "rdb"]


class StorageSpecError(ValueError):
    """`hydra.sweeper.storage` / `optuna.storage` is not one of the accepted forms."""


@dataclass(frozen=True)
class StorageSpec:
    kind: StorageKind
    url: str  # absolute, canonical form handed to jobs
    path: Path | None = None  # the journal file or the SQLite database
    dialect: str | None = None  # RDB: sqlite, postgresql, mysql, ...

    def describe(self) -> str:
        """The storage as optuna-dashboard and `hydra.sweeper.storage` take it, without a password: the
        journal file's path (Optuna has no URL form for it) or the database URL."""
        if self.kind == "journal":
            assert self.path is not None
            return str(self.path)
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def dashboard_hint(self, study_name: str) -> str:
        """How to open the study: with optuna-dashboard, and from Python with Optuna's API."""
        where = self.describe()
        if self.kind == "journal":
            api = (
                f"optuna.load_study(study_name={study_name!r}, storage=optuna.storages.JournalStorage("
                f"optuna.storages.journal.JournalFileBackend({where!r})))"
            )
        else:
            api = f"optuna.load_study(study_name={study_name!r}, storage={where!r})"
        return f"optuna-dashboard {where} | {api}"


def parse_storage(storage: str | None, study_name: str, cwd: Path | None = None) -> StorageSpec:
    """Resolve a storage setting to its canonical absolute form (see the module docstring for the forms)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    text = (storage or "").strip()
    if not text:
        return _journal(base / "mlruns" / "optuna" / f"{_safe_file_name(study_name)}.journal")
    if text.startswith("journal:"):
        rest = text[len("journal:") :]
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise StorageSpecError(
                f"storage {text!r}: the journal form needs a file, e.g. journal:///abs/x.journal"
            )
        path = Path(rest).expanduser()
        return _journal(path if path.is_absolute() else base / path)
    if "://" not in text:
        if text.endswith(".journal"):
            path = Path(text).expanduser()
            return _journal(path if path.is_absolute() else base / path)
        raise StorageSpecError(
            f"storage {text!r} is not understood; use null (journal under mlruns/optuna/), "
            "journal:///abs/path.journal, a path ending in .journal, sqlite:///file.db or postgresql://..."
        )
    if text.startswith("redis"):
        raise StorageSpecError(
            f"storage {text!r}: Redis is not supported here; use a journal file or PostgreSQL"
        )

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except ArgumentError as err:
        raise StorageSpecError(f"storage {text!r} is not a valid SQLAlchemy URL: {err}") from err
    dialect = url.get_backend_name()
    db_path: Path | None = None
    if dialect == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StorageSpecError(
                f"storage {text!r}: an in-memory SQLite database cannot be shared with the jobs; name a file"
            )
        db_path = Path(url.database).expanduser()
        if not db_path.is_absolute():
            db_path = base / db_path
        url = url.set(database=str(db_path))
    if url.drivername == "postgresql":
        url = url.set(drivername=_postgres_driver())
    return StorageSpec(
        kind="rdb", url=url.render_as_string(hide_password=False), path=db_path, dialect=dialect
    )


def _postgres_driver() -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; fall back to psycopg2 when only it is installed
    (the `postgres` extra installs psycopg2-binary)."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2"
    return "postgresql"


def _journal(path: Path) -> StorageSpec:
    path = Path(os.path.abspath(path))
    return StorageSpec(kind="journal", url=f"journal://{path.as_posix()}", path=path)


def _safe_file_name(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe or "study"


def open_storage(
    spec: StorageSpec,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: Any = None,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for `spec`. The heartbeat arguments only apply to RDB storages (Optuna's own
    heartbeat); journal storages get the sweeper's hand-written heartbeat instead (see heartbeat.py)."""
    import optuna

    if spec.kind == "journal":
        assert spec.path is not None
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        # JournalFileBackend's default lock (a symlink, force-released after 30 s) also works on NFS.
        return JournalStorage(JournalFileBackend(str(spec.path)))

    engine_kwargs: dict[str, Any] = {}
    if spec.dialect == "sqlite":
        assert spec.path is not None
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        # Wait for a write lock instead of failing at once with 'database is locked'.
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True  # survive a database restart between trials
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if heartbeat_interval is not None:
        kwargs["heartbeat_interval"] = int(heartbeat_interval)
        kwargs["grace_period"] = int(grace_period) if grace_period is not None else None
        if stale_trial_callback is not None:
            kwargs[_stale_callback_kwarg()] = stale_trial_callback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(spec.url, **kwargs)


def _stale_callback_kwarg() -> str:
    """Optuna 4.9 renamed RDBStorage's `failed_trial_callback` to `heartbeat_stale_trial_callback`."""
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in params
        else "failed_trial_callback"
    )


def retry_callback_class() -> Any:
    """Optuna's retry callback for stale trials, under its current name (renamed in 4.9)."""
    import optuna

    return (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        or optuna.storages.RetryFailedTrialCallback
    )


# ---------------------------------------------------------------------------------------------- ask lock
class StudyLock:
    """Serialises 'count the budget, reap stale trials, ask, suggest' across the study's worker processes.

    Without it two workers can both see n_trials - 1 trials and both ask one more, and two grid workers can
    pick the same grid point. Journal and SQLite storages use an flock()ed file next to the storage;
    PostgreSQL a session-level advisory lock. Both are released by the kernel / the server when a worker is
    killed, so a crash never leaves the study locked. Other databases get no lock (`exact` is False) and
    the sweeper falls back to marking surplus trials after the fact.
    """

    exact = False

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


class FileStudyLock(StudyLock):
    exact = True

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._thread_lock = threading.Lock()

    def acquire(self) -> None:
        import fcntl

        self._thread_lock.acquire()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._thread_lock.release()


class PostgresStudyLock(StudyLock):
    exact = True

    def __init__(self, url: str, key: int) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self._conn = self._engine.connect()
        self._key = key
        self._text = sqlalchemy.text

    def acquire(self) -> None:
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self._conn.commit()

    def release(self) -> None:
        self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        self._conn.commit()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        self._engine.dispose()


def study_lock(spec: StorageSpec, study_name: str) -> StudyLock:
    try:
        import fcntl  # noqa: F401  (POSIX only)

        has_flock = True
    except ImportError:
        has_flock = False
    if spec.path is not None and has_flock:
        safe = _safe_file_name(study_name)
        return FileStudyLock(spec.path.with_name(f"{spec.path.name}.{safe}.sweeper-lock"))
    if spec.dialect == "postgresql":
        digest = hashlib.sha256(f"masksweep:{study_name}".encode()).digest()
        return PostgresStudyLock(spec.url, int.from_bytes(digest[:8], "big", signed=True))
    log.warning(
        "storage %s has no cross-process ask lock here: with several workers the study may overshoot "
        "n_trials by a few trials (they are marked surplus and not counted)",
        spec.describe(),
    )
    return StudyLock()


# ---------------------------------------------------------------------------------------------- pruners
_PRUNER_KWARGS: dict[str, tuple[str, ...]] = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "percentile": ("percentile", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
    "none": (),
}


def pruner_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """{"name", "kwargs"} from a PrunerConfig mapping: only the keys the chosen pruner takes."""
    name = str(cfg.get("name") or "median").lower()
    if name in ("nop", "null"):
        name = "none"
    if name not in _PRUNER_KWARGS:
        raise ValueError(
            f"hydra.sweeper.pruner.name={name!r} is unknown; allowed: {', '.join(_PRUNER_KWARGS)}"
        )
    allowed = _PRUNER_KWARGS[name]
    kwargs = {k: v for k, v in cfg.items() if k != "name" and v is not None and k in allowed}
    ignored = sorted(k for k, v in cfg.items() if k != "name" and v is not None and k not in allowed)
    if ignored:
        log.warning("pruner %s ignores %s", name, ", ".join(ignored))
    if name == "percentile":
        kwargs.setdefault("percentile", 25.0)
    return {"name": name, "kwargs": kwargs}


def build_pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    name = spec.get("name", "median")
    kwargs = dict(spec.get("kwargs") or {})
    factories: dict[str, Any] = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    if name not in factories:
        raise ValueError(f"pruner {name!r} is unknown; allowed: {', '.join(factories)}")
    return factories[name](**kwargs)
