"""masksweep's Hydra sweeper on Optuna >= 4 (ask/tell), selected with `hydra/sweeper: masksweep_optuna`.

A thin adapter, laid out like Hydra's own Optuna sweeper plugin; what the trials share with it (storages,
trial identity, retries, heartbeat, the study registry) lives in `masksweep.study`, and masksweep never
imports this package.

Modules:
  config.py      the settings: dataclasses in Hydra's ConfigStore (hydra/sweeper, .../sampler, .../pruner)
  sweeper.py     the thin Sweeper class Hydra instantiates
  _impl.py       the ask -> launch -> tell loop, in batches of n_jobs
  _space.py      Hydra sweep grammar -> Optuna distributions; trial params -> job overrides
  _results.py    end-of-study summary, optimization_results.yaml and plots

This file stays import-free: Hydra imports every module here while it scans for plugins.
"""
