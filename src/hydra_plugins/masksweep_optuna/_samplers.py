"""Optuna samplers by name, suggestions from the search space, and the default study name."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ._settings import SweepError
from ._space import SearchSpace, SearchSpaceError, grid_space

log = logging.getLogger(__name__)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler calls study.stop() when the grid is done, which raises outside Study.optimize(). The
    sweeper decides itself when the grid is exhausted (see _grid_left)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


_SAMPLER_KWARGS: dict[str, tuple[str, ...]] = {
    "tpe": ("seed", "n_startup_trials", "multivariate", "constant_liar"),
    "random": ("seed",),
    "grid": ("seed",),
    "qmc": ("seed", "qmc_type"),
    "cmaes": ("seed", "n_startup_trials"),
}


def build_sampler(
    cfg: Mapping[str, Any], space: SearchSpace, worker_index: int
) -> optuna.samplers.BaseSampler:
    name = str(cfg.get("name") or "tpe").lower()
    if name not in _SAMPLER_KWARGS:
        raise SweepError(
            f"hydra.sweeper.sampler.name={name!r} is unknown; allowed: {', '.join(_SAMPLER_KWARGS)}"
        )
    kwargs = {k: v for k, v in cfg.items() if k in _SAMPLER_KWARGS[name] and v is not None}
    ignored = sorted(
        k for k, v in cfg.items() if k != "name" and v is not None and k not in _SAMPLER_KWARGS[name]
    )
    if ignored:
        log.warning("sampler %s ignores %s", name, ", ".join(ignored))
    # Parallel workers (and resumed runs) with one seed would replay the same random points; grid and qmc
    # workers must share theirs, since it fixes the order of their point sequence.
    if name in ("tpe", "random", "cmaes") and kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + worker_index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(**kwargs)
        if name == "random":
            return optuna.samplers.RandomSampler(**kwargs)
        if name == "grid":
            return _GridSampler(grid_space(space), **kwargs)
        if name == "qmc":
            return optuna.samplers.QMCSampler(**kwargs)
        categorical = [n for n, d in space.distributions.items() if isinstance(d, CategoricalDistribution)]
        if categorical:
            raise SweepError(
                f"sampler cmaes cannot search categorical params ({', '.join(categorical)}); use tpe, or "
                "make them fixed overrides"
            )
        return optuna.samplers.CmaEsSampler(**kwargs)


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise SearchSpaceError(f"{name}: unsupported distribution {dist!r}")


def default_study_name(name: str, space: SearchSpace, direction: str) -> str:
    """<sweep name>-<6 hex>, e.g. `lr_wd-3fa2c1`: readable, and stable for the same command, so re-running it
    resumes the study while other overrides (`optimizer=adamw`) get their own."""
    key = json.dumps(
        {"space": space.describe(), "fixed": sorted(space.fixed), "direction": direction}, sort_keys=True
    )
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def sweep_name(config: DictConfig) -> str:
    """The selected `sweep=NAME` overlay, else the job name."""
    choice = OmegaConf.select(config, "hydra.runtime.choices.sweep", default=None)
    return str(choice) if choice else str(config.hydra.job.name)
