"""What the sweeper plugin and the trials share about an Optuna study, so that masksweep never imports
`hydra_plugins` (the plugin is a thin adapter over this package, as Hydra's own Optuna sweeper is):

  storage.py    storage URLs (journal / RDB), the cross-process ask lock, pruners, attribute names
  heartbeat.py  worker identity and heartbeat, stale-trial detection and retry
  registry.py   study-wide records (the MLflow parent run, live workers, the summary) set atomically
  reporter.py   TrialReporter: a trial's handle on its Optuna trial (report, prune, resume a dead attempt)

Nothing here imports optuna at module level: every trial imports this package.
"""

from masksweep.study.reporter import TrialReporter, carry_intermediate_values, dead_attempts

__all__ = ["TrialReporter", "carry_intermediate_values", "dead_attempts"]
