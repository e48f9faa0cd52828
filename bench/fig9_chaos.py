"""Figure 9: chaos at cluster scale, on the one-node SLURM fixture (scripts/slurm-cluster).

One sweep of M trials (200; smoke 20) with N slots (16; smoke 4) through the real sweeper's ask, launch,
report and tell path: hydra/launcher=slurm (masksweep's submitit_slurm settings), each trial one SLURM job.
The objective is trivial: it sleeps a length drawn from its param x (2-10 s; smoke 1-3 s), reporting every
second through TrialReporter, and stops on SIGTERM as masksweep-train's trials do. Meanwhile a chaos loop hits
10% of the jobs (one job at random in each ten, at a random moment of its sleep), alternately with `scancel`
(the trial FAILs and is retried as a new trial number with the same params) and `scontrol requeue` (the same
trial runs again after ~11 s, cred_expire, and restarts its sleep: it had not finished). sacct's states of
each hit job are kept with it, so a hit that missed shows.

The objective appends "<trial number> x=<param> <pid> <job id> start|end" to a record file. Recorded:
- finished trials lost: a trial seen finished during the run whose state or value changed by the end, plus any
  shortfall of finished trials below n_trials (target 0);
- trained twice: a params set that reached "end" in two COMPLETE trials, or a trial number whose job ran to
  the end twice (target 0);
- whether the study ends with exactly n_trials finished and nothing RUNNING; trials/s; the sweeper's own
  slot utilization (optimization_results.yaml's `compute`).
Without SLURM's daemons and clients the figure is skipped, with the reason in its notes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CLUSTER_SCRIPT = HERE.parents[1] / "scripts" / "slurm-cluster"
# What the cluster script starts and what the chaos loop calls (the daemons live in sbin).
TOOLS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "scontrol", "squeue")
SEARCH_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
HIT_EVERY = 10  # one job in each HIT_EVERY seen running is hit
APP_CONFIG = """
defaults:
  - _self_
x: 0.5
record: RECORD
sleep: {low: LOW, high: HIGH}
optuna: {storage: null, study_name: null, trial_number: null}
hydra:
  searchpath: [pkg://masksweep.conf]
  job: {chdir: false}
  output_subdir: null
  sweep: {dir: WORKDIR, subdir: '${hydra.job.num}'}
"""


# ----------------------------------------------------------------------------------------------- worker
def _worker() -> None:
    """The trivial objective, one SLURM job per trial run. Re-running it (a requeue) only sleeps again."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=os.environ["FIG9_CONF"], config_name="config")
    def task(cfg: DictConfig) -> float:
        from masksweep.interrupts import signals_raise
        from masksweep.study import TrialReporter

        job = os.environ.get("SLURM_JOB_ID", "-")

        def mark(what: str) -> None:
            with open(cfg.record, "a") as f:  # O_APPEND lines: safe across jobs
                f.write(f"{cfg.optuna.trial_number} x={cfg.x!r} {os.getpid()} {job} {what}\n")

        mark("start")
        reporter = TrialReporter.from_config(cfg.optuna)
        # The length is drawn from x's far digits, so it stays spread while TPE closes in on the best x.
        seconds = cfg.sleep.low + (cfg.sleep.high - cfg.sleep.low) * (float(cfg.x) * 1000 % 1)
        deadline, step = time.monotonic() + seconds, 0
        # As masksweep-train's trials do: SLURM's SIGTERM (scancel, requeue) stops the trial, which submitit
        # alone would ignore ("Bypassing signal SIGTERM") and so finish a trial that SLURM then runs again.
        with signals_raise():
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(1.0, left))
                step += 1
                if reporter is not None:
                    reporter.report(float(cfg.x), step=step)
        mark("end")
        return float(cfg.x)

    task()


# ----------------------------------------------------------------------------------------------- driver
class Chaos(threading.Thread):
    """Hits one job at random in each HIT_EVERY whose trial starts, alternately with scancel and scontrol
    requeue, at a random moment of its sleep (the record's "start" line plus up to 90% of the shortest sleep),
    so every hit lands on a job that is still running its trial."""

    def __init__(self, env: dict[str, str], record: Path, seed: int, within_s: float) -> None:
        super().__init__(name="fig9-chaos", daemon=True)
        self.env, self.record, self.rng, self.within_s = env, record, random.Random(seed), within_s
        self.stop = threading.Event()
        self.seen: list[str] = []  # job ids in the order their trial first started
        self.hits: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        pending: dict[str, tuple[float, int]] = {}  # job id -> (when to hit it, trial number)
        chosen, offset = self.rng.randrange(HIT_EVERY), 0
        while not self.stop.wait(0.2):
            if self.record.exists():
                with open(self.record) as f:
                    f.seek(offset)
                    text = f.read()
                complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next look
                offset += len(complete)
                for number, _, _, job, what in (line.split() for line in complete.splitlines()):
                    if what != "start" or job in self.seen:
                        continue  # a requeued job's second start is not hit again
                    if len(self.seen) % HIT_EVERY == chosen:
                        when = time.monotonic() + self.rng.uniform(0, 0.9 * self.within_s)
                        pending[job] = (when, int(number))
                    self.seen.append(job)
                    if len(self.seen) % HIT_EVERY == 0:
                        chosen = self.rng.randrange(HIT_EVERY)
            for job, (when, number) in list(pending.items()):
                if time.monotonic() < when:
                    continue
                del pending[job]
                action = ("scancel", "requeue")[len(self.hits) % 2]
                command = ["scancel", job] if action == "scancel" else ["scontrol", "requeue", job]
                done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=30)
                if done.returncode == 0:
                    hit = {"job": job, "trial": number, "action": action, "t": round(time.time(), 2)}
                    self.hits.append(hit)
                else:
                    self.errors.append(f"{' '.join(command)}: {done.stderr.strip()}")


def _sacct_states(jobs: list[str], env: dict[str, str]) -> dict[str, list[str]]:
    """Job id -> the accounting states of its runs, in order (a requeued job has one line per run)."""
    if not jobs:
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-D", "-j", ",".join(jobs), "-o", "JobID,State"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    states: dict[str, list[str]] = {job: [] for job in jobs}
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        if job in states:
            states[job].append(state.split()[0])
    return states


def _finished_now(study: str, spec: Any) -> dict[int, tuple[str, float | None]]:
    import optuna

    from masksweep.study.storage import open_storage

    try:
        trials = optuna.load_study(study_name=study, storage=open_storage(spec)).get_trials(deepcopy=False)
    except (KeyError, FileNotFoundError):  # not created yet
        return {}
    return {t.number: (t.state.name, t.value) for t in trials if t.state.is_finished()}


def _sweep(root: Path, cluster: Path, slots: int, trials: int, low: float, high: float) -> dict[str, Any]:
    import optuna
    import yaml

    from hydra_plugins.masksweep_optuna._results import count_trials
    from masksweep.study.storage import open_storage, parse_storage

    root.mkdir(parents=True)
    conf, record, study = root / "conf", root / "runs.txt", "fig9"
    conf.mkdir()
    text = APP_CONFIG.replace("RECORD", str(record)).replace("WORKDIR", str(root / "sweep"))
    (conf / "config.yaml").write_text(text.replace("LOW", str(low)).replace("HIGH", str(high)))
    env = {
        **os.environ,
        "FIG9_CONF": str(conf),
        "OMP_NUM_THREADS": "1",
        "SLURM_CONF": str(cluster / "etc" / "slurm.conf"),
        "PATH": SEARCH_PATH,
    }
    command = [
        sys.executable,
        str(HERE),
        "-m",
        "hydra/sweeper=masksweep_optuna",
        "hydra/launcher=slurm",
        "hydra/job_logging=disabled",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        "hydra.sweeper.check_config=null",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={slots}",
        "hydra.sweeper.slurm_poll_interval=2",
        "hydra.sweeper.sampler.name=tpe",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.pruner.name=none",
        "x=interval(0,1)",
    ]
    spec = parse_storage(None, study, cwd=root)
    chaos = Chaos(env, record, seed=0, within_s=low)
    timeout = 600 + trials * high  # a hang is a finding: stop it, keep the log
    tic = time.time()
    log_path = root / "sweep.log"
    with open(log_path, "w") as log_file:
        sweeper = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        chaos.start()
        seen: dict[int, tuple[str, float | None]] = {}
        while sweeper.poll() is None and time.time() - tic < timeout:
            time.sleep(2)
            seen.update(_finished_now(study, spec))  # a later state replaces it: compared at the end
        chaos.stop.set()
        if sweeper.poll() is None:
            sweeper.kill()
            sweeper.wait()
            raise RuntimeError(f"fig9: the sweeper did not end within {timeout:.0f} s (a hang): {log_path}")
    seconds = time.time() - tic
    chaos.join()
    if sweeper.returncode != 0:
        raise RuntimeError(f"fig9: the sweeper exited {sweeper.returncode}; see {log_path}")

    all_trials = optuna.load_study(study_name=study, storage=open_storage(spec)).get_trials(deepcopy=False)
    final = {t.number: (t.state.name, t.value) for t in all_trials}
    counts = count_trials(all_trials)
    changed = sorted(n for n, kept in seen.items() if final.get(n) != kept)
    lost = len(changed) + max(0, trials - counts.finished)
    lines = [line.split() for line in record.read_text().splitlines()]
    ends = Counter(int(n) for n, _, _, _, what in lines if what == "end")
    starts = Counter(int(n) for n, _, _, _, what in lines if what == "start")
    states = _sacct_states([h["job"] for h in chaos.hits], env)
    for hit in chaos.hits:  # what each hit did: CANCELLED, or REQUEUED then COMPLETED
        hit["sacct"] = states.get(hit["job"], [])
        hit["trial_state"] = final.get(hit["trial"], ("?", None))[0]
    ended_twice = sorted(n for n, k in ends.items() if k > 1)
    complete_params = Counter(
        repr(t.params) for t in all_trials if t.state.name == "COMPLETE" and ends[t.number] >= 1
    )
    params_twice = sorted(p for p, k in complete_params.items() if k > 1)
    results = yaml.safe_load((root / "sweep" / "optimization_results.yaml").read_text())
    return {
        "seconds": seconds,
        "trials_per_s": counts.finished / seconds,
        "counts": counts.as_dict(),
        "lost": lost,
        "changed_after_finishing": changed,
        "trained_twice": len(ended_twice) + len(params_twice),
        "trial_numbers_ended_twice": ended_twice,
        "params_completed_twice": params_twice,
        "exactly_n_trials": counts.finished == trials,
        "running_at_end": sum(1 for state, _ in final.values() if state == "RUNNING"),
        "runs_restarted": sum(1 for k in starts.values() if k > 1),
        "jobs_started": len(chaos.seen),
        "hits": chaos.hits,
        "chaos_errors": chaos.errors,
        "compute": results.get("compute"),
    }


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]


def run(ctx: Any) -> Any:
    from bench.common import Figure, Target, log, single

    slots, trials, (low, high) = (4, 20, (1.0, 3.0)) if ctx.smoke else (16, 200, (2.0, 10.0))
    fig = Figure(
        "9",
        "Chaos at cluster scale (SLURM)",
        f"one-node SLURM fixture declaring {slots} CPUs, hydra.sweeper.n_jobs={slots}, {trials} trials of a "
        f"trivial objective (a sleep of {low:g}-{high:g} s drawn from the param, reports through "
        "TrialReporter) through the real sweeper with hydra/launcher=slurm; a chaos loop hits 10% of the "
        "jobs, alternately scancel and scontrol requeue",
    )
    missing = missing_tools()
    if missing:
        fig.notes.append(
            "skipped: SLURM is not installed (missing: "
            f"{', '.join(missing)}); apt-get install slurmctld slurmd slurm-client munge slurmdbd "
            "mariadb-server, as .ci/run does"
        )
        fig.details["skipped"] = fig.notes[-1]
        for name in ("finished trials lost", "trials trained twice", "ends with exactly n_trials"):
            fig.targets.append(Target(name, "0" if "ends" not in name else "yes", None, None))
        return fig
    # Not under ctx.workdir (mode 0700): munged needs o+x on every directory above its socket.
    cluster = Path(tempfile.mkdtemp(prefix="masksweep-fig9-slurm-", dir="/tmp"))
    try:
        tic = time.perf_counter()
        start = subprocess.run(
            [str(CLUSTER_SCRIPT), "start", str(cluster), "--cpus", str(slots)],
            capture_output=True,
            text=True,
            timeout=240,
        )
        if start.returncode != 0:
            raise RuntimeError(f"the SLURM fixture did not start: {start.stderr.strip()[-500:]}")
        fig.metrics["cluster start-up"] = single(round(time.perf_counter() - tic, 1), "s")
        log(f"fig9: {slots} slots x {trials} trials on SLURM, with chaos")
        r = _sweep(ctx.workdir / "fig9", cluster, slots, trials, low, high)
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(cluster)], capture_output=True, timeout=120)
        shutil.rmtree(cluster, ignore_errors=True)
    actions = Counter(h["action"] for h in r["hits"])
    fig.metrics["trials/s"] = single(round(r["trials_per_s"], 3), "trials/s")
    fig.metrics["sweep wall time"] = single(round(r["seconds"], 1), "s")
    util = (r["compute"] or {}).get("slot_utilization")
    fig.metrics["slot utilization (compute.slot_utilization)"] = single(
        round(util, 3) if util is not None else None, "busy / (slots x wall)"
    )
    fig.metrics["jobs whose trial started"] = single(r["jobs_started"], "jobs")
    fig.metrics["jobs cancelled (scancel)"] = single(actions["scancel"], "jobs")
    fig.metrics["jobs requeued (scontrol requeue)"] = single(actions["requeue"], "jobs")
    took = sum(
        1
        for h in r["hits"]
        if ("CANCELLED" if h["action"] == "scancel" else "REQUEUED") in h["sacct"]
    )
    fig.metrics["hits that took effect (sacct: CANCELLED / REQUEUED)"] = single(took, "jobs")
    fig.metrics["trial runs restarted (requeued)"] = single(r["runs_restarted"], "trials")
    for key in ("failed", "retried"):
        fig.metrics[f"trials {key}"] = single(r["counts"].get(key), "trials")
    fig.targets.append(Target("finished trials lost", "0", r["lost"], r["lost"] == 0))
    fig.targets.append(Target("trials trained twice", "0", r["trained_twice"], r["trained_twice"] == 0))
    exact = r["exactly_n_trials"] and r["running_at_end"] == 0
    fig.targets.append(
        Target("ends with exactly n_trials finished, none RUNNING", "yes", "yes" if exact else "no", exact)
    )
    if r["chaos_errors"]:
        fig.notes.append(f"chaos commands that failed: {'; '.join(r['chaos_errors'][:5])}")
    fig.details = r
    return fig


if __name__ == "__main__":
    _worker()
