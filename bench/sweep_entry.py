"""`python -m bench.sweep_entry ARGS...` = `masksweep-train ARGS...`, with timing probes.

Used by figures 3 and 4: the real sweep (Hydra, the masksweep Optuna sweeper, train(), MLflow) runs
unchanged; a few functions are wrapped so that each call's wall-clock interval is appended to the
JSON-lines file named by $MASKSWEEP_BENCH_PROBES. The probes add two clock reads and one small write
per call (a few per epoch).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time

# (module, attribute, label). train() looks every one of these up at call time, so wrapping works.
PROBES = (
    ("masksweep.train", "train", "trial"),
    ("masksweep.engine", "train_one_epoch", "train"),
    ("masksweep.engine", "evaluate", "eval"),
    ("masksweep.data", "build_datasets", "datasets"),
    ("masksweep.model", "build_model", "model"),
    ("masksweep.tracking", "start_tracker", "mlflow_start"),
    ("masksweep.tracking", "log_run_inputs", "mlflow_inputs"),
    ("masksweep.artifacts", "save_overlays", "overlays"),
    ("masksweep.artifacts", "save_curves", "curves"),
    ("masksweep.checkpoint", "CheckpointManager.save", "checkpoint"),
    ("masksweep.checkpoint", "CheckpointManager.finish", "checkpoint"),
    ("masksweep.study.reporter", "TrialReporter.from_config", "optuna_reporter"),
    ("masksweep.study.reporter", "TrialReporter.report", "optuna_report"),
    ("masksweep.tracking", "MLflowTracker.finish", "mlflow_finish"),
)


def _record(path: str, label: str, start: float, end: float) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps({"label": label, "start": start, "end": end, "pid": os.getpid()}) + "\n")


def install(path: str) -> None:
    for module_name, attribute, label in PROBES:
        owner = importlib.import_module(module_name)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        # A class's __dict__ keeps classmethods wrapped; masksweep.tracking resolves its names lazily.
        raw = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
        is_classmethod = isinstance(raw, classmethod)
        function = raw.__func__ if is_classmethod else raw

        def make(function=function, label=label):
            @functools.wraps(function)
            def timed(*args, **kwargs):
                start = time.time()
                try:
                    return function(*args, **kwargs)
                finally:
                    _record(path, label, start, time.time())

            return timed

        wrapped = make()
        setattr(owner, name, classmethod(wrapped) if is_classmethod else wrapped)


def main() -> None:
    path = os.environ.get("MASKSWEEP_BENCH_PROBES")
    if path:
        install(path)
    from masksweep.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
