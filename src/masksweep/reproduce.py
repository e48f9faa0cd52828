"""`masksweep reproduce RUN_ID`: re-run a logged trial from its logged config and seed, then diff the runs.

The replay is a new MLflow run tagged `masksweep.reproduced_from=<RUN_ID>`, outside any sweep (no Optuna
pruner, no parent run). On the CPU its metrics match the source run exactly.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from masksweep.errors import MasksweepError, TrackingError, TrialStopped
from masksweep.tracking import TAG_REPRODUCED_FROM, RetryingClient, extra_run_tags, find_run, provenance

if TYPE_CHECKING:
    from mlflow.entities import Run

CONFIG_ARTIFACT = "config.yaml"
# Params that legitimately differ between a run and its replay.
VOLATILE_PARAMS = ("git.commit", "git.dirty")


def load_config(client: RetryingClient, run_id: str) -> DictConfig:
    """The run's logged resolved config (the `config.yaml` artifact)."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"run {run_id!r} has no {CONFIG_ARTIFACT} artifact (was it logged by masksweep-train?)"
            ) from exc
        return OmegaConf.load(path)


def replay_config(cfg: DictConfig, tracking_uri: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The logged config, made to run as a standalone trial tracked in `tracking_uri`'s store."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key in ("storage", "study_name", "trial_number"):  # not an Optuna trial: no pruner, no study
        OmegaConf.update(cfg, f"optuna.{key}", None, merge=False)
    OmegaConf.update(cfg, "tracking.enabled", True, merge=False)
    OmegaConf.update(cfg, "tracking.uri", tracking_uri, merge=False)  # the logged value is redacted
    # From scratch, into a checkpoint directory of its own (never over the source run's checkpoints).
    if "resume" in cfg:
        cfg.resume = None
    if OmegaConf.select(cfg, "checkpoint.dir", default=None) is not None:
        OmegaConf.update(cfg, "checkpoint.dir", None, merge=False)
    for override in overrides:
        if "=" not in override:
            raise TrackingError(f"override {override!r} is invalid; allowed: KEY=VALUE (e.g. device=cpu)")
        cfg.merge_with(OmegaConf.from_dotlist([override]))  # values typed as YAML: epochs=2 is an int
    return cfg


def git_warnings(source: Run) -> list[str]:
    logged = source.data.params.get("git.commit", "unknown")
    current = provenance()["git.commit"]
    warnings = []
    if logged == "unknown" or current == "unknown":
        warnings.append(f"cannot compare code versions (logged git commit: {logged}, current: {current})")
    elif logged != current:
        warnings.append(
            f"the run was logged at git commit {logged[:12]}, the code is now at {current[:12]}: "
            "metrics may differ"
        )
    if source.data.params.get("git.dirty") == "True":
        warnings.append("the run was logged from a working tree with uncommitted changes")
    return warnings


@dataclass
class Diff:
    params: list[tuple[str, str, str]]  # (key, source, replay) for the params that differ
    same_params: int
    metrics: list[tuple[str, float | None, float | None]]

    @property
    def metrics_match(self) -> bool:
        return all(a == b for _, a, b in self.metrics)


def diff_runs(source: Run, replay: Run) -> Diff:
    a, b = source.data.params, replay.data.params
    differing = [(k, a.get(k, ""), b.get(k, "")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    keys = sorted(
        k for k in set(source.data.metrics) | set(replay.data.metrics) if k.startswith(("final/", "val/"))
    )
    metrics = [(k, source.data.metrics.get(k), replay.data.metrics.get(k)) for k in keys]
    return Diff(differing, len(set(a) | set(b)) - len(differing), metrics)


def print_diff(source: Run, replay: Run, diff: Diff, console) -> None:
    from rich.table import Table

    from masksweep.compare import format_number

    name_a, name_b = f"source {source.info.run_id[:8]}", f"replay {replay.info.run_id[:8]}"
    status = Table(title="Runs", title_justify="left")
    for column in ("", name_a, name_b):
        status.add_column(column)
    status.add_row("run id", source.info.run_id, replay.info.run_id)
    status.add_row("status", source.info.status, replay.info.status)
    console.print(status)

    if diff.params:
        params = Table(title=f"Params that differ ({diff.same_params} identical)", title_justify="left")
        for column in ("param", name_a, name_b):
            params.add_column(column, overflow="fold")
        for key, value_a, value_b in diff.params:
            params.add_row(key, value_a or "(absent)", value_b or "(absent)")
        console.print(params)
    else:
        console.print(f"Params: all {diff.same_params} identical")

    metrics = Table(title="Final metrics", title_justify="left")
    for column, justify in (("metric", "left"), (name_a, "right"), (name_b, "right"), ("", "center")):
        metrics.add_column(column, justify=justify)
    for key, value_a, value_b in diff.metrics:
        same = value_a == value_b
        if same:
            mark = "="
        elif value_a is not None and value_b is not None:
            mark = f"Δ {format_number(value_b - value_a)}"
        else:
            mark = "≠"
        metrics.add_row(key, _exact(value_a), _exact(value_b), mark)
    console.print(metrics)


def _exact(value: float | None) -> str:
    return "-" if value is None else repr(value)


def reproduce(
    client: RetryingClient,
    run_id: str,
    tracking_uri: str | None,
    overrides: Sequence[str] = (),
    check: bool = False,
    out=None,
    err=None,
) -> int:
    """Replay `run_id` (a whole id or a unique prefix of 6+ hex digits); print the diff. Returns the exit
    status (1 with `check` when metrics differ)."""
    from rich.console import Console

    from masksweep.train import train

    out, err = out or sys.stdout, err or sys.stderr
    source = find_run(client, run_id)
    run_id = source.info.run_id
    cfg = replay_config(load_config(client, run_id), tracking_uri, overrides)
    for warning in git_warnings(source):
        print(f"masksweep reproduce: warning: {warning}", file=err)
    if source.data.tags.get("stop.kind") == "pruned":
        print(
            "masksweep reproduce: warning: the source trial was pruned by Optuna; the replay runs without "
            "the pruner, so it trains every epoch",
            file=err,
        )
    print(f"reproducing run {run_id} ({source.info.run_name}) ...", file=err)

    stopped: MasksweepError | None = None
    _log_progress()
    with extra_run_tags({TAG_REPRODUCED_FROM: run_id}):
        try:
            result = train(cfg)
            replay_id = result["run_id"]
        except TrialStopped as stop:  # a diverged source diverges again: still a replay worth diffing
            stopped, replay_id = stop, None
    if replay_id is None:
        replay_id = _latest_replay(client, source)
    replay = client.get_run(replay_id)
    diff = diff_runs(source, replay)
    console = Console(file=out, width=None if out.isatty() else 160)
    print_diff(source, replay, diff, console)
    if stopped is not None:
        print(f"masksweep reproduce: the replay stopped too: {stopped}", file=err)
    if diff.metrics_match:
        print(f"metrics identical to run {run_id}: replay is run {replay_id}", file=err)
        return 0
    print(
        f"masksweep reproduce: warning: metrics differ from run {run_id} (replay: run {replay_id})", file=err
    )
    return 1 if check else 0


def _latest_replay(client: RetryingClient, source: Run) -> str:
    query = f"tags.`{TAG_REPRODUCED_FROM}` = '{source.info.run_id}'"
    runs = client.search_runs(
        [source.info.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise TrackingError(f"the replay of run {source.info.run_id} was not recorded")
    return runs[0].info.run_id


def _log_progress() -> None:
    """train() logs one line per epoch; outside Hydra nobody configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    logging.getLogger("masksweep").setLevel(logging.INFO)
