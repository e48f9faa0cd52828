"""The Sweeper class Hydra instantiates from `hydra/sweeper: masksweep_optuna`; the work is in _impl.py.

Kept thin and import-light: Hydra imports this module while it scans for plugins on every start of every app,
so optuna is only imported when a sweep actually begins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.plugins.sweeper import Sweeper

if TYPE_CHECKING:
    from hydra.types import HydraContext, TaskFunction
    from omegaconf import DictConfig

    from ._impl import MasksweepOptunaSweeperImpl


class MasksweepOptunaSweeper(Sweeper):
    """Optuna ask/tell sweeper with pruning, divergence-aware trial states and resumable parallel studies."""

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str,
        n_trials: int,
        storage: str | None,
        study_name: str | None,
        max_failure_rate: float,
        heartbeat_interval: int,
        grace_period: int | None,
        max_retry: int | None,
        wait_for_running: bool,
        n_jobs: int | None = None,
        params: Any = None,
    ) -> None:
        from ._impl import MasksweepOptunaSweeperImpl, Settings

        settings = Settings.from_kwargs(
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            n_trials=n_trials,
            storage=storage,
            study_name=study_name,
            max_failure_rate=max_failure_rate,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            max_retry=max_retry,
            wait_for_running=wait_for_running,
            n_jobs=n_jobs,
            params=params,
        )
        self.impl: MasksweepOptunaSweeperImpl = MasksweepOptunaSweeperImpl(settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = self.impl.launcher

    def sweep(self, arguments: list[str]) -> Any:
        return self.impl.sweep(arguments)
