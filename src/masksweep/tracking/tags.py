"""Names shared by the tracker, the sweep's parent run, `compare` and `reproduce`: tags and sweep files."""

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_RESULTS_FILE = "optimization_results.yaml"
MAX_TAG_LENGTH = 5000

# Tag names shared with `masksweep compare` / `reproduce`.
TAG_TRIAL_NAME = "masksweep.trial_name"
TAG_ROLE = "masksweep.role"  # "sweep" on a multirun's parent run
TAG_REPRODUCED_FROM = "masksweep.reproduced_from"
TAG_ERROR = "error"
TAG_CHECKPOINT_DIR = "masksweep.checkpoint_dir"  # set by train()
STOP_TAGS = ("stop.kind", "stop.reason", "stop.step", "stop.value")
TAG_STUDY_NAME = "optuna.study_name"  # on a sweep's trials and its parent run
TAG_TRIAL_NUMBER = "optuna.trial_number"  # Optuna's number of the trial a run records
TAG_REQUEUES = "masksweep.requeues"  # how often the trial's job was requeued and its run continued
TAG_RETRIED_AS = "masksweep.retried_as"  # on a dead worker's run: the Optuna trial that retried it
TAG_EVAL_IMAGES = "eval.images_scored"  # "2 of 10": the val images each epoch's AP was computed on
