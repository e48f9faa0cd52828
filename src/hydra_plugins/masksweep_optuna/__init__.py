"""masksweep's Hydra sweeper on Optuna >= 4 (ask/tell), selected with `hydra/sweeper: masksweep_optuna`.

Modules:
  config.py      the settings: dataclasses in Hydra's ConfigStore (hydra/sweeper, .../sampler, .../pruner)
  sweeper.py     the thin Sweeper class Hydra instantiates
  _impl.py       the ask -> launch -> tell loop
  _space.py      Hydra sweep grammar -> Optuna distributions; trial params -> job overrides
  _backend.py    storages (journal / RDB), the cross-process ask lock, pruners (used by masksweep.pruning too)
  _heartbeat.py  worker heartbeat, stale-trial detection and retry
  _results.py    end-of-sweep summary, optimization_results.yaml and plots

This file stays import-free: masksweep.pruning imports `_backend` inside every trial, and Hydra imports every
module here while it scans for plugins.
"""
