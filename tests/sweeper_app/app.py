"""A toy Hydra app for the sweeper tests: `python tests/sweeper_app/app.py -m ...`.

Like masksweep-train in a sweep it reports a value per epoch through TrialReporter (which may raise
TrialPruned), raises TrialDiverged or crashes on chosen params, and returns the optimized metric.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from masksweep.errors import TrialDiverged
from masksweep.study import TrialReporter


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> object:
    reporter = TrialReporter.from_config(cfg.optuna)
    number = cfg.optuna.trial_number
    if cfg.record_dir:
        with open(Path(cfg.record_dir) / "runs.txt", "a") as f:
            f.write(f"{number} {os.getpid()}\n")
    if number is not None and number == cfg.hang_trial:
        Path(cfg.record_dir, f"hang-{number}").write_text(str(os.getpid()))
        time.sleep(cfg.hang_seconds)

    final = float(cfg.opt.bonus) - (float(cfg.x) - 0.3) ** 2
    for epoch in range(cfg.epochs):
        time.sleep(cfg.sleep)
        if cfg.mode == "crash":
            raise RuntimeError("simulated crash in the data loader")
        if cfg.mode == "diverge" and epoch == 1:
            raise TrialDiverged(reason="loss is nan", step=epoch, value=float("nan"))
        value = final * (epoch + 1) / cfg.epochs if final >= 0 else final * (2 - (epoch + 1) / cfg.epochs)
        if reporter is not None:
            reporter.report(value, step=epoch)
    if cfg.mode == "return_nan":
        return float("nan")
    if cfg.mode == "return_none":
        return None
    if cfg.mode == "return_text":
        return "good"
    return final


if __name__ == "__main__":
    main()
