"""Figure 7: one study, many workers, by simulation.

N worker processes (16; smoke 4) run the same `-m` sweep of a trivial objective on one study of M trials (500;
smoke 40), through the sweeper's own path: masksweep_optuna asks (under the study's ask lock), Hydra's basic
launcher runs the job, the job reports three epochs through TrialReporter (median pruner), the sweeper tells.
Against the journal file (the default storage) and against PostgreSQL ($MASKSWEEP_TEST_POSTGRES_URL, as
.ci/run sets it). In the journal run 2 workers are killed with SIGKILL once a third of the trials finished.

Recorded: duplicates (a trial number whose job ran twice), lost trials (finished before the kill and not
finished at the end, or a budget shortfall), trials/s, p50/p99 of the sweeper's ask (stale-trial reaping,
budget count, TPE's suggest) and tell, and TPE's cost per trial near the last trial. The worker is this file
run as a Hydra app (`python bench/fig7_scale.py -m ...`); it times the sweeper's `_claim` and `_tell` by
wrapping them, since the sweeper itself keeps no timings.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
KILLED_WORKERS = 2
APP_CONFIG = """
defaults:
  - _self_
  - override hydra/sweeper: masksweep_optuna
x: 0.5
y: 0.5
record: null
optuna: {storage: null, study_name: null, trial_number: null}
hydra:
  job: {chdir: false}
  output_subdir: null
  sweep:
    dir: WORKDIR/sweep-${oc.env:FIG7_WORKER}
    subdir: ${hydra.job.num}
  sweeper:
    check_config: null
    study_name: STUDY
    n_trials: TRIALS
    heartbeat_interval: 1
    grace_period: 5
    max_failure_rate: 1.0
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 5}
    params: {x: 'interval(0, 1)', y: 'tag(log, interval(1e-3, 1))'}
"""


# ----------------------------------------------------------------------------------------------- worker
def _worker() -> None:
    """One sweep worker: the Hydra app whose task is the trivial objective."""
    import hydra
    from omegaconf import DictConfig

    from hydra_plugins.masksweep_optuna import _budget, _impl

    timings = Path(os.environ["FIG7_TIMINGS"])

    def timed(name: str, method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - tic
                number = None
                if name == "tell" and args:
                    number = args[0].number
                with open(timings, "a") as f:  # O_APPEND lines: safe across processes
                    f.write(json.dumps({"op": name, "s": seconds, "trial": number}) + "\n")

        return wrapper

    _budget.Budget.claim = timed("ask", _budget.Budget.claim)
    _impl.MasksweepOptunaSweeperImpl._tell = timed("tell", _impl.MasksweepOptunaSweeperImpl._tell)

    @hydra.main(version_base="1.3", config_path=os.environ["FIG7_CONF"], config_name="config")
    def task(cfg: DictConfig) -> float:
        from masksweep.study import TrialReporter

        with open(cfg.record, "a") as f:
            f.write(f"{cfg.optuna.trial_number} {os.getpid()}\n")
        reporter = TrialReporter.from_config(cfg.optuna)
        value = -((cfg.x - 0.3) ** 2) - (cfg.y - 0.1) ** 2
        for epoch in (1, 2, 3):
            if reporter is not None:
                reporter.report(value * (4 - epoch) / 3, step=epoch)
        return value

    task()


# ----------------------------------------------------------------------------------------------- driver
def _simulate(root: Path, storage: str | None, workers: int, trials: int, kill: bool) -> dict[str, Any]:
    import optuna

    from masksweep.study.storage import open_storage, parse_storage

    root.mkdir(parents=True, exist_ok=True)
    study = f"fig7-{uuid.uuid4().hex[:6]}"
    conf = root / "conf"
    conf.mkdir(exist_ok=True)
    text = APP_CONFIG.replace("WORKDIR", str(root)).replace("STUDY", study).replace("TRIALS", str(trials))
    (conf / "config.yaml").write_text(text)
    record, timings = root / "runs.txt", root / "timings.jsonl"
    env = {**os.environ, "FIG7_CONF": str(conf), "FIG7_TIMINGS": str(timings), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE), "-m", f"record={record}", "hydra/job_logging=disabled"]
    if storage:
        command.append(f"hydra.sweeper.storage='{storage}'")
    spec = parse_storage(storage, study, cwd=root)
    tic = time.perf_counter()
    procs = [
        subprocess.Popen(
            command,
            cwd=root,
            env={**env, "FIG7_WORKER": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=open(root / f"worker-{i}.log", "w"),  # noqa: SIM115 (closed with the process)
            start_new_session=True,
        )
        for i in range(workers)
    ]
    before_kill: dict[int, Any] = {}
    if kill:
        store = open_storage(spec)
        finished: dict[int, Any] = {}
        while len(finished) < trials // 3:
            time.sleep(0.5)
            if all(p.poll() is not None for p in procs):
                break
            try:
                done = optuna.load_study(study_name=study, storage=store).get_trials(deepcopy=False)
            except KeyError:  # not created yet
                continue
            finished = {t.number: (t.state, t.value) for t in done if t.state.is_finished()}
        before_kill = finished
        for p in procs[:KILLED_WORKERS]:
            os.killpg(p.pid, signal.SIGKILL)
    codes = [p.wait(timeout=3600) for p in procs]
    seconds = time.perf_counter() - tic
    survivors = codes[KILLED_WORKERS:] if kill else codes
    if any(code != 0 for code in survivors):
        raise RuntimeError(f"fig7 workers exited with {codes}; see {root}/worker-*.log")

    all_trials = optuna.load_study(study_name=study, storage=open_storage(spec)).get_trials(deepcopy=False)
    by_number = {t.number: t for t in all_trials}
    ran = [int(line.split()[0]) for line in record.read_text().splitlines()]
    duplicates = len(ran) - len(set(ran))
    from hydra_plugins.masksweep_optuna._results import count_trials

    counts = count_trials(all_trials)
    lost_after_kill = sum(
        1 for n, kept in before_kill.items() if (by_number[n].state, by_number[n].value) != kept
    )
    lost = lost_after_kill + max(0, trials - counts.finished)
    ops: dict[str, list[float]] = {"ask": [], "tell": []}
    for line in timings.read_text().splitlines():
        row = json.loads(line)
        ops[row["op"]].append(row["s"])
    asks = ops["ask"]
    if storage and spec.kind == "rdb":
        optuna.delete_study(study_name=study, storage=open_storage(spec))
    return {
        "seconds": seconds,
        "trials_per_s": counts.finished / seconds,
        "duplicates": duplicates,
        "lost": lost,
        "counts": counts.as_dict(),
        "exit_codes": codes,
        "ask_ms": [a * 1000 for a in asks],
        "tell_ms": [t * 1000 for t in ops["tell"]],
        "killed": KILLED_WORKERS if kill else 0,
        "finished_before_kill": len(before_kill),
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tpe_cost_at(trials: int) -> float:
    """TPE's suggest time (ms) for the trials just before `trials`, on an in-memory study with the same space:
    the sampler's own cost, apart from the storage and the lock."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    space = {
        "x": optuna.distributions.FloatDistribution(0, 1),
        "y": optuna.distributions.FloatDistribution(1e-3, 1, log=True),
    }
    costs = []
    for _ in range(trials):
        tic = time.perf_counter()
        trial = study.ask(space)
        costs.append(time.perf_counter() - tic)
        study.tell(trial, -((trial.params["x"] - 0.3) ** 2) - (trial.params["y"] - 0.1) ** 2)
    return statistics.median(costs[-max(5, trials // 20) :]) * 1000


def run(ctx: Any) -> Any:
    from bench.common import Figure, Target, log, single, summary

    workers, trials = (4, 40) if ctx.smoke else (16, 500)
    fig = Figure(
        "7",
        "One study, many workers (simulation)",
        f"{workers} sweep worker processes, one study of {trials} trials of a trivial objective, masksweep's "
        "sweeper (ask under the study lock, basic launcher, 3 reports through TrialReporter with the median "
        f"pruner, tell); journal file (SIGKILL of {KILLED_WORKERS} workers after a third of the trials) and "
        "PostgreSQL",
    )
    backends: dict[str, tuple[str | None, bool]] = {"journal": (None, True)}
    pg = os.environ.get("MASKSWEEP_TEST_POSTGRES_URL")
    if pg:
        backends["postgresql"] = (pg, False)
    else:
        fig.notes.append("PostgreSQL not measured: MASKSWEEP_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    for name, (storage, kill) in backends.items():
        log(f"fig7: {name}, {workers} workers x {trials} trials{' with a kill' if kill else ''}")
        r = _simulate(ctx.workdir / f"fig7-{name}", storage, workers, trials, kill)
        fig.metrics[f"{name}: trials/s"] = single(round(r["trials_per_s"], 2), "trials/s")
        for op in ("ask", "tell"):
            values = r[f"{op}_ms"]
            fig.metrics[f"{name}: {op} p50"] = single(_percentile(values, 0.5), "ms")
            fig.metrics[f"{name}: {op} p99"] = single(_percentile(values, 0.99), "ms")
        fig.metrics[f"{name}: ask per trial"] = summary(r["ask_ms"], "ms")
        fig.targets.append(Target(f"{name}: duplicate trials", "0", r["duplicates"], r["duplicates"] == 0))
        fig.targets.append(Target(f"{name}: lost trials", "0", r["lost"], r["lost"] == 0))
        fig.details[name] = {k: v for k, v in r.items() if not k.endswith("_ms")}
    cost = tpe_cost_at(trials)
    fig.metrics[f"TPE suggest cost per trial @ trial {trials}"] = single(round(cost, 2), "ms")
    return fig


if __name__ == "__main__":
    _worker()
