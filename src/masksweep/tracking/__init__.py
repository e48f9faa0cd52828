"""MLflow tracking: one run per trial, nested under a parent run per multirun.

- `store`: the embedded SQLite store, which store to use (option, $MLFLOW_TRACKING_URI, default) and its
  checks, a client that retries on locks;
- `runs`: run ids as users type them (a unique prefix of 6+ hex digits);
- `params`: what a run records about its inputs (flattened config, provenance, secrets masked);
- `hydra_dirs`: where Hydra put the job;
- `tracker`: one trial's run and how it ends;
- `parent`: the sweep's parent run (a Hydra callback);
- `tags`: the names the others and `compare` / `reproduce` share.

The names below load on first use (PEP 562), and mlflow only inside the functions: `import masksweep.train`
and `masksweep --help` stay fast, and `masksweep compare` does not import Hydra to reach the store.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "hydra_output_dir": "hydra_dirs",
    "sweep_dir": "hydra_dirs",
    "PRIVATE_KEYS": "params",
    "config_params": "params",
    "flatten": "params",
    "provenance": "params",
    "redacted_config": "params",
    "redacted_hydra_dir": "params",
    "SweepRunCallback": "parent",
    "RunNotFound": "runs",
    "find_run": "runs",
    "resolve_run_id": "runs",
    "CLI_OPTION": "store",
    "RetryingClient": "store",
    "TRAIN_OPTION": "store",
    "check_reachable": "store",
    "check_store": "store",
    "default_store": "store",
    "experiment_id": "store",
    "first_line": "store",
    "open_client": "store",
    "redact_uri": "store",
    "resolve_uri": "store",
    "sqlite_path": "store",
    "PARENT_RUN_FILE": "tags",
    "STOP_TAGS": "tags",
    "SWEEP_RESULTS_FILE": "tags",
    "TAG_CHECKPOINT_DIR": "tags",
    "TAG_ERROR": "tags",
    "TAG_REPRODUCED_FROM": "tags",
    "TAG_ROLE": "tags",
    "TAG_TRIAL_NAME": "tags",
    "MLflowTracker": "tracker",
    "Tracker": "tracker",
    "checkpoint_dir_of_run": "tracker",
    "extra_run_tags": "tracker",
    "log_run_inputs": "tracker",
    "start_tracker": "tracker",
    "stop_tags": "tracker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
