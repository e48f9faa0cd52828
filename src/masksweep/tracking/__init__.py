"""MLflow tracking: one run per trial, nested under a parent run per multirun.

- `store`: the embedded SQLite store, reachability checks, a client that retries on locks;
- `params`: what a run records about its inputs (flattened config, provenance, secrets masked);
- `hydra_dirs`: where Hydra put the job;
- `tracker`: one trial's run and how it ends;
- `parent`: the sweep's parent run (a Hydra callback);
- `tags`: the names the others and `compare` / `reproduce` share.

mlflow itself is imported lazily: `import masksweep.train` and `masksweep --help` stay fast.
"""

from masksweep.tracking.hydra_dirs import hydra_output_dir, sweep_dir
from masksweep.tracking.params import (
    PRIVATE_KEYS,
    config_params,
    flatten,
    provenance,
    redacted_config,
    redacted_hydra_dir,
)
from masksweep.tracking.parent import SweepRunCallback
from masksweep.tracking.store import (
    RetryingClient,
    check_reachable,
    default_store,
    experiment_id,
    first_line,
    open_client,
    redact_uri,
    sqlite_path,
)
from masksweep.tracking.tags import (
    PARENT_RUN_FILE,
    STOP_TAGS,
    SWEEP_RESULTS_FILE,
    TAG_CHECKPOINT_DIR,
    TAG_ERROR,
    TAG_REPRODUCED_FROM,
    TAG_ROLE,
    TAG_TRIAL_NAME,
)
from masksweep.tracking.tracker import (
    MLflowTracker,
    Tracker,
    checkpoint_dir_of_run,
    extra_run_tags,
    log_run_inputs,
    start_tracker,
    stop_tags,
)

__all__ = [
    "PARENT_RUN_FILE",
    "PRIVATE_KEYS",
    "STOP_TAGS",
    "SWEEP_RESULTS_FILE",
    "TAG_CHECKPOINT_DIR",
    "TAG_ERROR",
    "TAG_REPRODUCED_FROM",
    "TAG_ROLE",
    "TAG_TRIAL_NAME",
    "MLflowTracker",
    "RetryingClient",
    "SweepRunCallback",
    "Tracker",
    "check_reachable",
    "checkpoint_dir_of_run",
    "config_params",
    "default_store",
    "experiment_id",
    "extra_run_tags",
    "first_line",
    "flatten",
    "hydra_output_dir",
    "log_run_inputs",
    "open_client",
    "provenance",
    "redact_uri",
    "redacted_config",
    "redacted_hydra_dir",
    "sqlite_path",
    "start_tracker",
    "stop_tags",
    "sweep_dir",
]
