"""Set-up of a sweep before any trial runs: the search space checked (every choice and both ends of every
range composed and validated), the study opened under its lock, and the job identity kept out of Hydra's
override_dirname."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict, read_write
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from masksweep.errors import MasksweepError
from masksweep.study import storage as B
from masksweep.tracking.store import first_line

from ._samplers import build_sampler
from ._settings import Settings, SweepError
from ._space import SearchSpace, SearchSpaceError, grid_space, parse_search_space

log = logging.getLogger(__name__)

# The job-config keys that carry the trial's identity (conf/train.yaml's `optuna:` block).
IDENTITY_KEYS = ("optuna.storage", "optuna.study_name", "optuna.trial_number")


@dataclass
class Space:
    space: SearchSpace
    sampler_name: str
    n_trials: int  # the budget (a grid smaller than n_trials makes it the grid's size)
    grid: dict[str, list[Any]] | None  # sampler grid: every param's values


def check_space(s: Settings, arguments: list[str], hydra_context: HydraContext, config: DictConfig) -> Space:
    """Everything about the search space that can be wrong, checked before any storage or run is made."""
    try:
        space = parse_search_space(s.params, arguments)
    except SearchSpaceError as err:
        raise SweepError(f"search space: {err}") from err
    if not space.distributions:
        log.warning("the search space is empty: every trial runs the same config")
    sampler_name = str(s.sampler.get("name") or "tpe").lower()
    n_trials = int(s.n_trials)
    grid: dict[str, list[Any]] | None = None
    if sampler_name == "grid":
        try:
            grid = grid_space(space)
        except SearchSpaceError as err:
            raise SweepError(str(err)) from err
        # Grid trials record categorical distributions: the grid's values are the whole space.
        space.distributions = {n: CategoricalDistribution(v) for n, v in grid.items()}
        size = math.prod(len(v) for v in grid.values())
        if size < n_trials:
            log.info("sampler grid has %d points: n_trials %d -> %d", size, n_trials, size)
            n_trials = size
    build_sampler(s.sampler, space, 0)  # a sampler/space mismatch
    try:
        B.pruner_spec(s.pruner)
    except ValueError as err:
        raise SweepError(str(err)) from None
    probe_configs(space, s.check_config, hydra_context, config)
    return Space(space, sampler_name, n_trials, grid)


def probe_configs(
    space: SearchSpace, check_config: str | None, hydra_context: HydraContext, config: DictConfig
) -> None:
    """Compose (and check with `check_config`) a job config at every choice and both ends of every range,
    so `lr=choice(-1)` or `optimizer=choice(sgd, foo)` stops the sweep before its first trial."""
    check = _load_check(check_config)
    base = {name: _probe_values(dist)[0] for name, dist in space.distributions.items()}
    probes = [
        (name, value, {**base, name: value})
        for name, dist in space.distributions.items()
        for value in _probe_values(dist)
    ] or [(None, None, {})]
    for name, value, params in probes:
        overrides = space.job_overrides(params)
        where = "the fixed overrides" if name is None else f"{name}={value}"
        try:
            job_cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        except Exception as err:
            raise SweepError(f"search space: {where} does not compose: {first_line(err)}") from None
        if check is not None:
            try:
                with read_write(job_cfg), open_dict(job_cfg):
                    check(job_cfg)
            except MasksweepError as err:
                raise SweepError(f"search space: {where}: {err}") from None
            except Exception as err:
                raise SweepError(
                    f"hydra.sweeper.check_config={check_config} cannot check this app's "
                    f"config ({type(err).__name__}: {first_line(err)}); allowed: a check for this app, or "
                    "null"
                ) from None


@dataclass
class OpenStudy:
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    lock: B.StudyLock  # the study's ask lock (the caller closes it)
    worker_index: int  # this worker's place among the study's workers (a sampler seed offset)
    existing: int  # trials the study held already


def open_study(s: Settings, spec: B.StorageSpec, space: SearchSpace, study_name: str) -> OpenStudy:
    """Create or load the study under its lock, with this worker's sampler and the sweep's pruner."""
    retry_cb = None
    if spec.kind == "rdb":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry_cb = B.retry_callback_class()(max_retry=s.max_retry)
    pruner = B.pruner_spec(s.pruner)
    lock = B.study_lock(spec, study_name)
    try:
        with lock.hold():
            # Under the lock: workers starting together on an empty database would race to create
            # Optuna's tables.
            storage = B.open_storage(
                spec,
                heartbeat_interval=s.heartbeat_interval if spec.kind == "rdb" else None,
                grace_period=s.grace_period,
                stale_trial_callback=retry_cb,
            )
            study = optuna.create_study(
                study_name=study_name,
                storage=storage,
                direction=s.direction,
                load_if_exists=True,
                pruner=B.build_pruner(pruner),
            )
            _check_direction(study, s.direction)
            study_id = storage.get_study_id_from_name(study_name)
            attrs = storage.get_study_system_attrs(study_id)
            if attrs.get(B.PRUNER_ATTR) != pruner:
                storage.set_study_system_attr(study_id, B.PRUNER_ATTR, pruner)
            worker_index = int(attrs.get(B.WORKERS_ATTR, 0))
            storage.set_study_system_attr(study_id, B.WORKERS_ATTR, worker_index + 1)
            study.sampler = build_sampler(s.sampler, space, worker_index)
            existing = len(study.get_trials(deepcopy=False))
    except BaseException:
        lock.close()
        raise
    return OpenStudy(study, storage, lock, worker_index, existing)


def _check_direction(study: optuna.Study, direction: str) -> None:
    if len(study.directions) != 1:
        raise SweepError(f"study {study.study_name} is multi-objective; this sweeper handles one objective")
    have = study.direction.name.lower()
    if have != direction:
        raise SweepError(
            f"study {study.study_name} already exists with direction {have}, but "
            f"hydra.sweeper.direction is {direction}; use another hydra.sweeper.study_name"
        )


def _probe_values(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, (IntDistribution, FloatDistribution)):
        return [dist.low] if dist.low == dist.high else [dist.low, dist.high]
    raise SearchSpaceError(f"unsupported distribution {dist!r}")


def _load_check(path: str | None) -> Any:
    """`module.function` -> the function (masksweep.validation.validate for masksweep-train)."""
    if not path:
        return None
    import importlib

    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SweepError(
            f"hydra.sweeper.check_config={path!r} cannot be imported ({err}); allowed: a module.function "
            "path, or null"
        ) from None


def exclude_identity_from_override_dirname(config: DictConfig) -> None:
    """Keep optuna.* (a storage URL, a trial number) out of ${hydra.job.override_dirname}: each job's
    config is re-composed from the master's hydra overrides, so the exclusion goes there."""
    try:
        current = list(config.hydra.job.config.override_dirname.exclude_keys)
        missing = [k for k in IDENTITY_KEYS if k not in current]
        if not missing:
            return
        keys = current + missing
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.job.config.override_dirname.exclude_keys = keys
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"
            )
    except Exception as err:  # cosmetic: never stop a sweep for it
        log.debug("could not exclude %s from override_dirname: %s", IDENTITY_KEYS, err)
