"""The sweeper's settings (`hydra.sweeper.*`, see config.py), checked as the sweeper is built; its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from masksweep.errors import MasksweepError


class SweepError(MasksweepError):
    """The sweep cannot start or cannot go on; the message says why and what to change."""


class FailureRateExceeded(SweepError):
    """More than max_failure_rate * n_trials trials failed."""


@dataclass
class Settings:
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    direction: str = "maximize"
    n_trials: int = 20
    storage: str | None = None
    study_name: str | None = None
    max_failure_rate: float = 0.25
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int | None = 3
    wait_for_running: bool = True
    n_jobs: int | None = None
    slurm_poll_interval: float = 10.0
    params: dict[str, Any] | None = None
    check_config: str | None = None
    study_parent_run: bool = True

    def __post_init__(self) -> None:
        self.direction = str(self.direction).lower()
        if self.direction not in ("maximize", "minimize"):
            raise SweepError(
                f"hydra.sweeper.direction={self.direction!r} is invalid; allowed: maximize, minimize "
                "(one objective: the task returns one float)"
            )
        if int(self.n_trials) < 1:
            raise SweepError(f"hydra.sweeper.n_trials={self.n_trials} is invalid; allowed: an integer >= 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise SweepError(
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} is invalid; allowed: 0..1"
            )
        if int(self.heartbeat_interval) < 1:
            raise SweepError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} is invalid; allowed: >= 1 s"
            )
        if self.grace_period is None:
            self.grace_period = 2 * int(self.heartbeat_interval) + 60
        if int(self.grace_period) <= int(self.heartbeat_interval):
            raise SweepError(
                f"hydra.sweeper.grace_period={self.grace_period} must exceed heartbeat_interval="
                f"{self.heartbeat_interval}, or live trials would be taken for stale ones"
            )
        if self.n_jobs is None:
            self.n_jobs = 1
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise SweepError(
                f"hydra.sweeper.n_jobs={self.n_jobs!r} is invalid; allowed: an integer >= 1 (trials launched "
                "together through hydra/launcher)"
            )

        if not float(self.slurm_poll_interval) > 0:
            raise SweepError(
                f"hydra.sweeper.slurm_poll_interval={self.slurm_poll_interval} is invalid; allowed: > 0 s"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Settings:
        plain = {
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
            for k, v in kwargs.items()
        }
        return cls(**plain)


class SweepInterrupted(SweepError):
    """SIGINT / SIGTERM stopped the sweep; its trial was failed and queued again."""
