"""Figure 8: slot utilization and time to n_trials, batch against asynchronous, on the same trial lengths.

The trial lengths are a real pruned TPE study's: figure 3b's recorded trials (its "with pruning" sweeps, every
seed in order) in bench/results/latest.json, one training step = STEP_S seconds of sleep, so a trial pruned at
its first rung is 5x shorter than one that ran every epoch. Trial number k sleeps length k on both sides, so
the two sides run identical work and differ only in how it is scheduled:

- asynchronous: masksweep's sweeper (hydra/sweeper=masksweep_optuna, n_jobs slots), which refills a slot the
  moment a trial ends; each trial reports every step through TrialReporter (pruner none: the pruning already
  happened in the recorded study);
- batch: Hydra's stock behaviour, its basic sweeper with max_batch_size = slots: launch n_jobs trials as one
  `launcher.launch(batch)`, wait for the slowest, repeat (what Hydra's own Optuna sweeper does with n_jobs).

Both run this file as the Hydra app (`python bench/fig8_slots.py -m ...`) through
hydra/launcher=submitit_local. Busy slot-time is measured the same way on both sides, per job: from its
process's start (recorded by the job) to its result file's write (submitit's `_result.pkl`): a slot is
occupied from the job's start-up to its result, as a GPU would be. Utilization = busy slot-time / (slots x the
span from the first job's start to the last result); time to n_trials is the whole `-m` command's wall
time. The sweeper's own `compute.slot_utilization` (its SlotClock, over its whole run, set-up included) is
reported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
STEP_S = {"full": 0.5, "smoke": 0.25}  # sleep per recorded training step
APP_CONFIG = """
defaults:
  - _self_
x: 0.5
trial: null
record: RECORD
lengths: LENGTHS
optuna: {storage: null, study_name: null, trial_number: null}
hydra:
  job: {chdir: false}
  output_subdir: null
  sweep: {dir: WORKDIR, subdir: '${hydra.job.num}'}
"""


# ----------------------------------------------------------------------------------------------- worker
def _worker() -> None:
    """The trivial objective: sleep the recorded length of trial k, one report per recorded step."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=os.environ["FIG8_CONF"], config_name="config")
    def task(cfg: DictConfig) -> float:
        import psutil

        from masksweep.study import TrialReporter

        number = cfg.optuna.trial_number if cfg.optuna.trial_number is not None else cfg.trial
        steps, step_s = cfg.lengths[int(number)]
        reporter = TrialReporter.from_config(cfg.optuna)  # None on the batch side (no study)
        for step in range(1, int(steps) + 1):
            time.sleep(float(step_s))
            if reporter is not None:
                reporter.report(float(cfg.x), step=step)
        import submitit

        # The job's end is its result file's write, after this returns: read from the file once it exists.
        row = {
            "trial": int(number),
            "start": psutil.Process().create_time(),
            "result": str(submitit.JobEnvironment().paths.result_pickle),
        }
        with open(cfg.record, "a") as f:  # O_APPEND lines: safe across processes
            f.write(json.dumps(row) + "\n")
        return float(cfg.x)

    task()


# ----------------------------------------------------------------------------------------------- driver
def recorded_lengths(results: Path) -> list[int]:
    """Training steps of figure 3b's 'with' trials (pruned TPE search), seed by seed in trial order."""
    try:
        figures = json.loads(results.read_text())["figures"]
        search = next(f for f in figures if f["id"] == "3b")
        per_seed = search["details"]["trials_with"]
    except (OSError, ValueError, KeyError, StopIteration) as err:
        raise RuntimeError(
            f"{results}: no figure 3b trials to draw lengths from ({type(err).__name__}: {err}); allowed: a "
            "full bench run's latest.json (python -m bench --only 3b)"
        ) from None
    return [t["steps"] for seed in sorted(per_seed, key=int) for t in per_seed[seed]]


def _side(root: Path, name: str, slots: int, lengths: list[list[float]], extra: list[str]) -> dict[str, Any]:
    """One `-m` run; returns its wall time and every job's (start, end)."""
    side = root / name
    conf = side / "conf"
    conf.mkdir(parents=True)
    record = side / "jobs.jsonl"
    text = APP_CONFIG.replace("RECORD", str(record)).replace("WORKDIR", str(side / "sweep"))
    (conf / "config.yaml").write_text(text.replace("LENGTHS", json.dumps(lengths)))
    env = {**os.environ, "FIG8_CONF": str(conf), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE), "-m", "hydra/launcher=submitit_local", "hydra/job_logging=disabled"]
    tic = time.time()
    with open(side / "sweep.log", "w") as log_file:
        done = subprocess.run(
            [*command, *extra], cwd=side, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    wall = time.time() - tic
    if done.returncode != 0:
        raise RuntimeError(f"fig8 {name} side exited {done.returncode}; see {side / 'sweep.log'}")
    jobs = [json.loads(line) for line in record.read_text().splitlines()]
    for job in jobs:
        job["end"] = os.path.getmtime(job["result"])
    numbers = sorted(j["trial"] for j in jobs)
    if numbers != list(range(len(lengths))):
        raise RuntimeError(f"fig8 {name} side ran trials {numbers}, not 0..{len(lengths) - 1} once each")
    first, last = min(j["start"] for j in jobs), max(j["end"] for j in jobs)
    busy = sum(j["end"] - j["start"] for j in jobs)
    span = last - first
    # A slot's idle time between one job's result and the next job's start: the k-th result is matched to the
    # (k + slots)-th start, which is the start it freed (asynchronous) or the batch's next (batch).
    ends, starts = sorted(j["end"] for j in jobs), sorted(j["start"] for j in jobs)
    gaps = [s - e for e, s in zip(ends, starts[slots:], strict=False)]
    out = {
        "wall_s": wall,
        "span_s": span,
        "busy_s": busy,
        "utilization": busy / (slots * span),
        "gap_median_s": statistics.median(gaps) if gaps else None,
        "job_median_s": statistics.median(j["end"] - j["start"] for j in jobs),
    }
    results = side / "sweep" / "optimization_results.yaml"
    if results.is_file():
        import yaml

        out["sweeper_compute"] = yaml.safe_load(results.read_text()).get("compute")
    return out


def run(ctx: Any) -> Any:
    from bench.common import REPO, Figure, Target, log, single

    slots, trials = (2, 6) if ctx.smoke else (4, 40)
    step_s = STEP_S[ctx.sizes.name]
    steps = recorded_lengths(REPO / "bench" / "results" / "latest.json")
    if len(steps) < trials:
        raise RuntimeError(f"figure 3b recorded {len(steps)} trials; figure 8 needs {trials}")
    steps = steps[:trials]
    lengths = [[s, step_s] for s in steps]
    fig = Figure(
        "8",
        "Slot utilization, batch vs asynchronous",
        f"{slots} slots x {trials} trials on hydra/launcher=submitit_local; trial k sleeps figure 3b's "
        f"recorded steps of its k-th pruned-TPE trial x {step_s} s ({min(steps)}-{max(steps)} steps: "
        f"{step_s * min(steps):g}-{step_s * max(steps):g} s), the same on both sides. Asynchronous: "
        f"masksweep's sweeper, n_jobs={slots}; batch: Hydra's basic sweeper, max_batch_size={slots} "
        "(launch a batch, wait for its slowest, repeat)",
    )
    root = ctx.workdir / "fig8"
    sides = {
        "asynchronous": [
            "hydra/sweeper=masksweep_optuna",
            "hydra.sweeper.check_config=null",
            f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweeper.n_jobs={slots}",
            "hydra.sweeper.study_name=fig8",
            "hydra.sweeper.sampler.name=tpe",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.pruner.name=none",
            "x=interval(0,1)",
        ],
        "batch": [f"hydra.sweeper.max_batch_size={slots}", f"trial=range(0,{trials})"],
    }
    measured: dict[str, dict[str, Any]] = {}
    for name, extra in sides.items():
        log(f"fig8: {name}, {slots} slots x {trials} trials")
        measured[name] = r = _side(root, name, slots, lengths, extra)
        fig.metrics[f"{name}: slot utilization"] = single(round(r["utilization"], 3), "busy / (slots x span)")
        fig.metrics[f"{name}: time to n_trials"] = single(round(r["wall_s"], 1), "s")
        fig.metrics[f"{name}: first job start to last result"] = single(round(r["span_s"], 1), "s")
        fig.metrics[f"{name}: a slot's gap from a result to the next start, median"] = single(
            round(r["gap_median_s"], 2), "s"
        )
        fig.metrics[f"{name}: job length (start-up + sleep), median"] = single(
            round(r["job_median_s"], 2), "s"
        )
    sweeper_util = (measured["asynchronous"].get("sweeper_compute") or {}).get("slot_utilization")
    fig.metrics["asynchronous: the sweeper's own compute.slot_utilization"] = single(
        round(sweeper_util, 3) if sweeper_util is not None else None, "busy / (slots x its wall)"
    )
    ideal = sum(s * step_s for s in steps) / slots
    fig.metrics["sleep alone / slots (no start-up, perfect packing)"] = single(round(ideal, 1), "s")
    a, b = measured["asynchronous"], measured["batch"]
    ratio = a["wall_s"] / b["wall_s"]
    fig.metrics["asynchronous / batch time to n_trials"] = single(round(ratio, 3), "ratio")
    util = round(a["utilization"], 3)
    fig.targets.append(Target("asynchronous slot utilization", ">= 0.9", util, util >= 0.9))
    fig.targets.append(
        Target("asynchronous / batch time to n_trials", "<= 0.8", round(ratio, 3), ratio <= 0.8)
    )
    fig.details = {"steps": steps, "step_s": step_s, "slots": slots, "sides": measured}
    return fig


def analysis(fig: Any) -> str | None:
    """Where the asynchronous side's idle slot-time goes, and what it implies for longer trials."""
    sides = fig.details.get("sides")
    if not sides or fig.status == "met":
        return None
    a, b = sides["asynchronous"], sides["batch"]
    gap, job = a["gap_median_s"], a["job_median_s"]
    sleep = statistics.median(fig.details["steps"]) * fig.details["step_s"]
    return (
        f"The asynchronous side refills a slot {gap:.2f} s (median) after a job's result: the sweeper's "
        "poll, tell, next ask, the job's config composition and submitit's submission, on this shared 2-core "
        f"machine. Against jobs of {job:.1f} s (median: {sleep:.1f} s of sleep plus the job's start-up) that "
        f"alone predicts a utilization near {job / (job + gap):.2f} (measured: {a['utilization']:.3f}, the "
        "first starts and the tail, where slots run out of trials, included). The "
        f"batch side waits for each batch's slowest trial (median gap {b['gap_median_s']:.2f} s, utilization "
        f"{b['utilization']:.3f}). The refill gap is per trial, not per second of training: with the same "
        f"gap, trials of one minute would keep the slots {60 / (60 + gap):.2f} busy."
    )


if __name__ == "__main__":
    _worker()
