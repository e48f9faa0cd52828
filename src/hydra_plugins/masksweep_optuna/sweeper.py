"""The Sweeper class Hydra instantiates from `hydra/sweeper: masksweep_optuna`; the work is in _impl.py.

Kept thin and import-light: Hydra imports this module while it scans for plugins on every start of every app,
so optuna is only imported when a sweep actually begins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from hydra.plugins.sweeper import Sweeper

if TYPE_CHECKING:
    from hydra.types import HydraContext, TaskFunction
    from omegaconf import DictConfig

    from ._impl import MasksweepOptunaSweeperImpl

T = TypeVar("T")


def _one_line_errors(call: Callable[[], T]) -> T:
    """A bad setting or search space is one line and exit status 1 (Ctrl-C / SIGTERM: 130), not Hydra's
    traceback: SystemExit passes through Hydra's error reporting. HYDRA_FULL_ERROR=1 shows the traceback."""
    from masksweep.errors import MasksweepError

    try:
        return call()
    except MasksweepError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from ._impl import SweepInterrupted

        print(f"masksweep-train: {exc}", file=sys.stderr)
        raise SystemExit(130 if isinstance(exc, SweepInterrupted) else 1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or masksweep.interrupts.Interrupted for SIGTERM too
        print("masksweep-train: sweep interrupted; run the same command again to resume it", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_status", 130)) from None


class MasksweepOptunaSweeper(Sweeper):
    """Optuna ask/tell sweeper with pruning, divergence-aware trial states and resumable parallel studies."""

    def __init__(self, **settings: Any) -> None:
        from ._impl import MasksweepOptunaSweeperImpl, Settings

        self.impl: MasksweepOptunaSweeperImpl = _one_line_errors(
            lambda: MasksweepOptunaSweeperImpl(Settings.from_kwargs(**settings))
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = self.impl.launcher

    def sweep(self, arguments: list[str]) -> Any:
        return _one_line_errors(lambda: self.impl.sweep(arguments))
