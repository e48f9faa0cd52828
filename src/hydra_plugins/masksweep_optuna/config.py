"""Settings of the masksweep Optuna sweeper, registered in Hydra's ConfigStore.

Select it in a sweep overlay's defaults list with `- override /hydra/sweeper: masksweep_optuna`, then set
`hydra.sweeper.*`. The sampler and the pruner are config groups too (`hydra/sweeper/sampler:
tpe|random|grid|qmc|cmaes`, `hydra/sweeper/pruner: median|percentile|successive_halving|hyperband|none`),
so configs written for Hydra's own Optuna sweeper (`- override hydra/sweeper/sampler: random`,
`hydra.sweeper.sampler.seed: 1`) keep working; `hydra.sweeper.sampler.name=random` does the same from the
command line.

Keyword arguments left null are not passed to Optuna, so its own defaults apply.
"""

# No `from __future__ import annotations` here: Hydra's plugin scanner executes this module before it is in
# sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SAMPLERS = ("tpe", "random", "grid", "qmc", "cmaes")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")


@dataclass
class SamplerConfig:
    name: str = "tpe"  # tpe | random | grid | qmc | cmaes
    # Same seed -> same suggestions for a sequential sweep. Each further worker process (or a resumed run)
    # of the study gets seed + k, so parallel workers do not suggest the same points; grid and qmc keep the
    # seed as is, because their workers must agree on the point sequence.
    seed: int | None = None
    n_startup_trials: int | None = None  # tpe, cmaes: random trials before the model kicks in
    multivariate: bool | None = None  # tpe
    constant_liar: bool | None = None  # tpe: treat running trials as bad, to spread parallel workers out
    qmc_type: str | None = None  # qmc: sobol | halton


@dataclass
class PrunerConfig:
    name: str = "median"  # median | percentile | successive_halving | hyperband | none
    # median, percentile
    n_startup_trials: int | None = None  # no pruning until this many trials finished
    n_warmup_steps: int | None = None  # no pruning before this epoch (steps are the epochs reported)
    interval_steps: int | None = None
    n_min_trials: int | None = None
    percentile: float | None = None  # percentile: prune below this percentile (default 25)
    # successive_halving, hyperband
    min_resource: Any = None  # int, or "auto"
    max_resource: Any = None  # hyperband: int, or "auto"
    reduction_factor: int | None = None
    min_early_stopping_rate: int | None = None  # successive_halving
    bootstrap_count: int | None = None


@dataclass
class MasksweepOptunaSweeperConf:
    _target_: str = "hydra_plugins.masksweep_optuna.sweeper.MasksweepOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: SamplerConfig = MISSING
    pruner: PrunerConfig = MISSING

    direction: str = "maximize"  # maximize | minimize
    # The STUDY's budget: the sweep stops handing out trials once the study holds n_trials trials (stale
    # trials that were retried do not count). Re-running the command continues a study until it has n_trials.
    n_trials: int = 20
    # null = a journal file mlruns/optuna/<study_name>.journal under the launch directory. Otherwise
    # journal:///abs/path.journal, journal://rel/path.journal, a path ending in .journal, sqlite:///file.db,
    # or an SQLAlchemy URL (postgresql://user:pass@host/db) for workers on several machines.
    storage: str | None = None
    # null = <job name>-<hash of the search space and fixed overrides>: the same command resumes the same
    # study.
    study_name: str | None = None
    # The sweep stops with an error once more than max_failure_rate * n_trials trials FAILED (crashed,
    # returned NaN/None). Pruned and diverged trials are not failures.
    max_failure_rate: float = 0.25
    # Stale-trial detection: the sweeper process beats every heartbeat_interval seconds for the trial it runs;
    # a RUNNING trial whose beat is older than grace_period is failed and retried (max_retry times).
    heartbeat_interval: int = 60
    grace_period: int | None = None  # null = 2 * heartbeat_interval + 60
    max_retry: int | None = 3  # null = retry without limit
    # When the budget is spent but other workers still run trials, wait for them (and retry theirs if their
    # worker dies) before writing the final results.
    wait_for_running: bool = True
    # Trials in flight at once through hydra/launcher: the next trial is asked and launched the moment any
    # one ends, so no slot idles while a long trial finishes (e.g. `hydra/launcher=joblib
    # hydra.sweeper.n_jobs=4`, or hydra/launcher=slurm for SLURM jobs; the basic launcher runs one at a
    # time). null = 1. Several sweep commands on one study add up (each is a worker with its own slots).
    n_jobs: int | None = None
    # SLURM jobs: how often the scheduler's accounting is asked whether a job ended without a result
    # (cancelled, failed, its node lost); a job that ends normally is seen within a second.
    slurm_poll_interval: float = 10.0

    # The search space, in Hydra's sweep grammar (same as Hydra's Optuna sweeper), e.g.
    #   lr: tag(log, interval(1e-4, 1e-2))   optimizer: choice(sgd, adam)   epochs: range(5, 10)
    params: dict[str, str] | None = None

    # A `module.function` called with the job config composed at every choice and both ends of every
    # range before the study starts; it raises (a MasksweepError) to reject the search space in one line.
    check_config: str | None = "masksweep.validation.validate"
    # The study keeps one MLflow parent run for all its workers and reruns (masksweep.tracking.parent);
    # masksweep's SweepRunCallback then makes none of its own.
    study_parent_run: bool = True


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="masksweep_optuna",
    node=MasksweepOptunaSweeperConf,
    provider="masksweep_optuna",
)
for _name in SAMPLERS:
    ConfigStore.instance().store(
        group="hydra/sweeper/sampler", name=_name, node=SamplerConfig(name=_name), provider="masksweep_optuna"
    )
for _name in PRUNERS:
    ConfigStore.instance().store(
        group="hydra/sweeper/pruner", name=_name, node=PrunerConfig(name=_name), provider="masksweep_optuna"
    )
