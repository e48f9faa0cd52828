"""Figures 3 and 4: the compute a sweep saves, and what each trial costs beyond its training and evaluation.

The real `masksweep-train -m sweep=seed_table` runs twice in a subprocess (through bench.sweep_entry, which
only adds timing probes), with the report's six trials plus a forced-divergent one (bench/conf/experiment/
diverge.yaml, lr 50), sized down for a CPU:
- "with": divergence detection on (the default) and a median pruner;
- "without": `divergence=off` and pruner none: every trial runs its whole schedule.
Steps come from MLflow (`train/loss` is logged every step here) and Optuna (`divergence_detected_at`).
Figure 4 uses the same two sweeps: each trial's share of the sweep's wall time minus its training and
evaluation compute (the probes' intervals).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_CONF,
    Context,
    Figure,
    Target,
    bench_env,
    log,
    model_size_for,
    script,
    single,
    summary,
)
from bench.report import pruner_label

GRID_SEED = 0  # fixes the grid sampler's trial order, so both sweeps run the trials in the same order
# Successive halving (ASHA): after epoch 1, 3, 9 a trial goes on only if it is in the top third of the
# trials that reached that epoch. A median pruner compares only with COMPLETE trials, so in a short grid it
# cannot prune before two trials have run their whole schedule (the last benchmark measured 0.725 with it).
PRUNER = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}
VARIANTS = {
    "with": [f"hydra.sweeper.pruner.{k}={v}" for k, v in PRUNER.items()],
    "without": ["divergence=off", "hydra.sweeper.pruner.name=none"],
}
OVERHEAD_TARGET_S = 2.0
STOP_LAG_TARGET = 5


def data_overrides(
    ctx: Context, image_size: int | None = None, num_train: int | None = None, num_val: int | None = None
) -> list[str]:
    """Data and pretraining overrides of a benchmark sweep (default: the seed-table sweep's sizes)."""
    s = ctx.sizes
    overrides = [
        f"data.image_size={image_size or s.sweep_image_size}",
        f"data.num_train={num_train or s.sweep_num_train}",
        f"data.num_val={num_val or s.sweep_num_val}",
        f"data.cache_dir={ctx.cache_dir / 'synthetic'}",
    ]
    overrides += model_size_for(overrides)
    if s.sweep_pretrain_steps > 0:
        overrides += [
            "++model.pretrain.enabled=true",
            f"model.pretrain.steps={s.sweep_pretrain_steps}",
            f"model.pretrain.warmup_iters={min(50, s.sweep_pretrain_steps // 3)}",
            "model.pretrain.num_images=64",
            f"model.pretrain.cache_dir={ctx.cache_dir / 'pretrained'}",
        ]
    else:
        overrides.append("++model.pretrain.enabled=false")
    return overrides


def ensure_pretrained(ctx: Context, overrides: list[str] | None = None) -> float:
    """Pretrain (once, cached) before the sweeps, so that neither sweep pays for it."""
    if ctx.sizes.sweep_pretrain_steps <= 0:
        return 0.0
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = ctx.compose(*(overrides if overrides is not None else data_overrides(ctx)))
    tic = time.perf_counter()
    instantiate(OmegaConf.to_container(cfg.model, resolve=True))  # build_model pretrains on a cache miss
    return time.perf_counter() - tic


def sweep_command(ctx: Context, variant: str, sweep_dir: Path, study: str) -> list[str]:
    s = ctx.sizes
    command = [
        sys.executable,
        "-m",
        "bench.sweep_entry",
        "-m",
        "sweep=seed_table",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.searchpath=[file://{BENCH_CONF}]",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={len(s.sweep_experiments)}",
        f"hydra.sweeper.sampler.seed={GRID_SEED}",
        f"experiment={','.join(s.sweep_experiments)}",
        *data_overrides(ctx),
        f"optimized_metric={s.sweep_metric}",
        "trainer.log_every_n_steps=1",  # every step in MLflow: the step counts below are exact
        "trainer.progress=false",
        "device=cpu" if ctx.device == "cpu" else f"device={ctx.device}",
        *VARIANTS[variant],
    ]
    if s.sweep_epochs is not None:
        command.append(f"epochs={s.sweep_epochs}")
    return command


def run_sweep(ctx: Context, variant: str) -> dict[str, Any]:
    root = ctx.workdir / "fig3"
    study = f"bench-{variant}-{uuid.uuid4().hex[:8]}"
    command = sweep_command(ctx, variant, root / f"sweep-{variant}", study)
    return launch(root, variant, command, study)


def launch(root: Path, name: str, command: list[str], study: str) -> dict[str, Any]:
    """Run one sweep command in `root` (its mlruns/ holds the study and the runs), with timing probes."""
    root.mkdir(parents=True, exist_ok=True)
    probes = root / f"probes-{name}.jsonl"
    env = bench_env()
    env["MASKSWEEP_BENCH_PROBES"] = str(probes)
    log(f"sweep {name}: {' '.join(command[3:])}")
    tic = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - tic
    (root / f"sweep-{name}.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {result.returncode}: {result.stderr[-2000:]}")
    trials = read_trials(root, study)
    intervals = [json.loads(line) for line in probes.read_text().splitlines()] if probes.is_file() else []
    return {"variant": name, "study": study, "wall_s": wall, "trials": trials, "intervals": intervals}


def read_trials(root: Path, study_name: str) -> list[dict[str, Any]]:
    import optuna
    from mlflow import MlflowClient

    from masksweep.tracking import default_store

    backend = optuna.storages.journal.JournalFileBackend(
        str(root / "mlruns" / "optuna" / f"{study_name}.journal")
    )
    study = optuna.load_study(study_name=study_name, storage=optuna.storages.JournalStorage(backend))
    client = MlflowClient(default_store(root, create=False)[0])
    experiment = client.get_experiment_by_name("masksweep")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`optuna.study_name` = '{study_name}'", max_results=1000
    )
    by_number = {
        int(run.data.tags["optuna.trial_number"]): run
        for run in runs
        if "optuna.trial_number" in run.data.tags
    }
    trials = []
    for trial in study.trials:
        run = by_number.get(trial.number)
        history = client.get_metric_history(run.info.run_id, "train/loss") if run else []
        logged = max((m.step for m in history), default=0)
        detected = trial.user_attrs.get("divergence_detected_at")
        trials.append(
            {
                "number": trial.number,
                "experiment": trial.params.get("experiment"),
                "params": dict(trial.params),
                "state": trial.state.name,
                "value": trial.value,
                "diverged": bool(trial.user_attrs.get("diverged", False)),
                "divergence_step": trial.user_attrs.get("divergence_step"),
                "divergence_detected_at": detected,
                "epochs_reported": len(trial.intermediate_values),
                "intermediate": {int(k): v for k, v in trial.intermediate_values.items()},
                "steps": max(logged, int(detected or 0)),
                "start": trial.datetime_start.timestamp() if trial.datetime_start else None,
                "end": trial.datetime_complete.timestamp() if trial.datetime_complete else None,
                "run_status": run.info.status if run else None,
            }
        )
    return sorted(trials, key=lambda t: t["number"])


def best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    complete = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    return max(complete, key=lambda t: t["value"]) if complete else None


# ------------------------------------------------------------------------------------------ pruning replay
# Pruner settings replayed over trial orders (PrunerConfig keys, as `hydra.sweeper.pruner.*` takes them).
PRUNER_GRID: tuple[dict[str, Any], ...] = (
    {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
    {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
    {"name": "percentile", "percentile": 75.0, "n_startup_trials": 2, "n_warmup_steps": 1},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    {"name": "hyperband", "min_resource": 1, "max_resource": 10, "reduction_factor": 3},
)
REPLAY_ORDERS = 360  # orders sampled (with a fixed seed) when there are more than this


def replay(
    curves: dict[str, list[float]], order: tuple[str, ...], pruner: dict[str, Any]
) -> tuple[dict[str, int], str | None]:
    """Epochs each trial runs, and the best COMPLETE trial, when trials with these full per-epoch curves run
    in `order` under `pruner`: Optuna's own pruner on an in-memory study, reported and asked after every
    epoch as masksweep's TrialReporter does. Trials missing from `curves` (the diverged ones) are skipped."""
    import optuna

    from masksweep.study.storage import build_pruner, pruner_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=build_pruner(pruner_spec(pruner)))
    epochs_run: dict[str, int] = {}
    finals: dict[str, float] = {}
    for name in order:
        curve = curves.get(name)
        if curve is None:
            continue
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            epochs_run[name] = epoch
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])
            finals[name] = curve[-1]
    return epochs_run, max(finals, key=finals.__getitem__) if finals else None


def order_study(
    with_: list[dict[str, Any]], without: list[dict[str, Any]], steps_per_epoch: int
) -> dict[str, Any] | None:
    """Replay pruners over many orders of the trials, from the "without" sweep's full curves (the trials
    that diverged in the "with" sweep keep the steps they ran there): how the saving and the best trial
    depend on the order the grid happens to run the trials in, and on the pruner and its settings."""
    import random

    diverged = {t["experiment"]: t["steps"] for t in with_ if t["diverged"]}
    curves = {
        t["experiment"]: [t["intermediate"][k] for k in sorted(t["intermediate"])]
        for t in without
        if t["experiment"] not in diverged
    }
    if any(not c for c in curves.values()):
        return None
    total = sum(t["steps"] for t in without)
    reference = (best(without) or {}).get("experiment")
    names = tuple(t["experiment"] for t in without)

    def steps_of(epochs: dict[str, int]) -> int:
        return sum(diverged.values()) + steps_per_epoch * sum(epochs.values())

    orders = list(itertools.permutations(names))
    if len(orders) > REPLAY_ORDERS:
        orders = random.Random(0).sample(orders, REPLAY_ORDERS)
    real_order = tuple(t["experiment"] for t in sorted(with_, key=lambda t: t["number"]))
    real_epochs, _ = replay(curves, real_order, PRUNER)
    study: dict[str, Any] = {
        "orders": len(orders),
        "of_orders": math.factorial(len(names)),
        "replayed_steps_for_the_real_order": steps_of(real_epochs),
        "real_steps": sum(t["steps"] for t in with_),
        "settings": [],
    }
    for pruner in PRUNER_GRID:
        fractions, same = [], 0
        for order in orders:
            epochs, winner = replay(curves, order, pruner)
            fractions.append(steps_of(epochs) / total)
            same += winner == reference
        study["settings"].append(
            {
                "pruner": pruner,
                "steps_fraction_median": round(statistics.median(fractions), 4),
                "steps_fraction_min": round(min(fractions), 4),
                "steps_fraction_max": round(max(fractions), 4),
                "share_of_orders_at_most_half": round(sum(f <= 0.5 for f in fractions) / len(fractions), 4),
                "share_of_orders_same_best": round(same / len(fractions), 4),
            }
        )
    return study


# ------------------------------------------------------------------------------------------ figure 4 parts
def trial_overheads(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Per trial: its cycle (previous trial's end -> its end, i.e. ask, launch, train(), tell), the
    training and evaluation compute inside it, and what is left: the overhead."""
    rows = []
    trials = [t for t in sweep["trials"] if t["start"] is not None and t["end"] is not None]
    intervals = sweep["intervals"]
    previous_end = None
    for trial in trials:
        begin = trial["start"] if previous_end is None else previous_end
        end = trial["end"]
        inside = [i for i in intervals if i["start"] >= begin - 1e-3 and i["end"] <= end + 1e-3]
        compute = sum(i["end"] - i["start"] for i in inside if i["label"] in ("train", "eval"))
        parts: dict[str, float] = {}
        for i in inside:
            if i["label"] not in ("train", "eval", "trial"):
                parts[i["label"]] = parts.get(i["label"], 0.0) + i["end"] - i["start"]
        call = sum(i["end"] - i["start"] for i in inside if i["label"] == "trial")
        rows.append(
            {
                "number": trial["number"],
                "experiment": trial["experiment"],
                "cycle_s": end - begin,
                "compute_s": compute,
                "overhead_s": end - begin - compute,
                "inside_train_s": call - compute,
                "outside_train_s": end - begin - call,
                "first": previous_end is None,
                "parts": parts,
            }
        )
        previous_end = end
    return rows


def startup(ctx: Context) -> dict[str, Any]:
    """`masksweep-train --help` wall time, and the heavy packages its start-up imports."""
    env = bench_env()
    times = []
    for _ in range(ctx.sizes.startup_repeats):
        tic = time.perf_counter()
        subprocess.run(
            [script("masksweep-train"), "--help"], env=env, capture_output=True, timeout=120, check=True
        )
        times.append(time.perf_counter() - tic)
    cli_times = []
    for _ in range(ctx.sizes.startup_repeats):
        tic = time.perf_counter()
        subprocess.run([script("masksweep"), "--help"], env=env, capture_output=True, timeout=120, check=True)
        cli_times.append(time.perf_counter() - tic)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", script("masksweep-train"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    top: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if not cumulative.isdigit() or name.startswith(" "):
            continue
        package = name.split(".")[0]
        if name == package:  # top-level package: its cumulative time includes its submodules
            top[package] = top.get(package, 0.0) + int(cumulative) / 1e6
    heavy = {k: round(v, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}
    return {"train_help_s": times, "cli_help_s": cli_times, "import_seconds": heavy}


# ------------------------------------------------------------------------------------------ the figures
def run(ctx: Context) -> tuple[Figure, Figure]:
    s = ctx.sizes
    pretrain_s = ensure_pretrained(ctx)
    if pretrain_s:
        log(f"fig3: pretrained the tiny preset once in {pretrain_s:.1f}s (cached, outside both sweeps)")
    sweeps = {variant: run_sweep(ctx, variant) for variant in ("with", "without")}
    with_, without = sweeps["with"], sweeps["without"]
    steps = {v: sum(t["steps"] for t in sweeps[v]["trials"]) for v in sweeps}
    best_with, best_without = best(with_["trials"]), best(without["trials"])
    diverged = [t for t in with_["trials"] if t["experiment"] == "diverge"]
    lag = None
    if diverged and diverged[0]["diverged"]:
        lag = int(diverged[0]["divergence_detected_at"]) - int(diverged[0]["divergence_step"])
    epochs_note = "their own epochs (5; trial6 10)" if s.sweep_epochs is None else f"epochs={s.sweep_epochs}"
    steps_per_epoch = -(-s.sweep_num_train // 4)
    fig3 = Figure(
        "3a",
        "Sweep compute saved, seed table",
        f"sweep=seed_table over {', '.join(s.sweep_experiments)} ({epochs_note}; diverge = forced-divergent "
        f"SGD lr 50, bench/conf/experiment/diverge.yaml), grid order "
        f"seed {GRID_SEED}, {s.sweep_image_size}px synthetic data, {s.sweep_num_train} train / "
        f"{s.sweep_num_val} val images ({steps_per_epoch} steps/epoch), "
        + (
            f"tiny preset pretrained once for {s.sweep_pretrain_steps} steps (cached before the sweeps); "
            if s.sweep_pretrain_steps
            else "random init; "
        )
        + f"optimized_metric={s.sweep_metric}; 'with' = divergence detection + pruner "
        f"{pruner_label(PRUNER)}; 'without' = divergence=off, pruner none",
    )
    ratio = steps["with"] / steps["without"] if steps["without"] else float("nan")
    fig3.metrics["training steps, with"] = single(steps["with"], "steps")
    fig3.metrics["training steps, without"] = single(steps["without"], "steps")
    fig3.metrics["steps with / without"] = single(round(ratio, 4), "ratio")
    fig3.metrics["sweep wall time, with"] = single(round(with_["wall_s"], 1), "s")
    fig3.metrics["sweep wall time, without"] = single(round(without["wall_s"], 1), "s")
    fig3.metrics["wall time with / without"] = single(round(with_["wall_s"] / without["wall_s"], 4), "ratio")
    fig3.metrics["divergent trial: steps from first bad step to stop"] = single(lag, "steps")
    fig3.targets.append(Target("steps with / without", "<= 0.5", round(ratio, 4), ratio <= 0.5))
    same = (
        best_with is not None
        and best_without is not None
        and best_with["experiment"] == best_without["experiment"]
    )
    fig3.targets.append(
        Target(
            "same best trial",
            "same experiment",
            f"{(best_with or {}).get('experiment')} vs {(best_without or {}).get('experiment')}",
            same,
        )
    )
    fig3.targets.append(
        Target(
            "divergent trial stopped",
            f"<= {STOP_LAG_TARGET} steps after its first bad step",
            lag,
            lag is not None and lag <= STOP_LAG_TARGET,
        )
    )
    for variant in sweeps:
        fig3.details[f"trials_{variant}"] = [
            {k: v for k, v in t.items() if k not in ("start", "end")} for t in sweeps[variant]["trials"]
        ]
    replay = order_study(with_["trials"], without["trials"], steps_per_epoch)
    if replay is not None:
        fig3.details["pruner_replay_over_all_orders"] = replay
    if diverged:
        fig3.notes.append(
            f"Divergent trial with detection: first bad step {diverged[0]['divergence_step']}, stopped at "
            "step "
            f"{diverged[0]['divergence_detected_at']} (divergence.sync_every=4), "
            f"{diverged[0]['steps']} steps run instead of the "
            f"{next((t['steps'] for t in without['trials'] if t['experiment'] == 'diverge'), '?')} it ran "
            "without detection."
        )
    fig3.notes.append(
        "Step counts are deterministic for a given order (seeded trials, same data); the wall times are one "
        "run each on a shared machine."
    )
    if pretrain_s:
        fig3.details["pretrain_seconds"] = round(pretrain_s, 1)
    if s.sweep_metric != "val/ap_segm":
        fig3.notes.append(
            f"The sweeps optimize {s.sweep_metric}, not the default val/ap_segm: after a pretraining this "
            "short the mask head's AP is ~0 for every trial, so ap_segm cannot rank them; ap_bbox comes from "
            "the same evaluation and does."
        )

    # ---- figure 4
    rows = [row for sweep in sweeps.values() for row in trial_overheads(sweep)]
    steady = [r for r in rows if not r["first"]] or rows
    fig4 = Figure(
        "4",
        "Per-trial overhead",
        "the two sweeps of figure 3 (in-process basic launcher, embedded SQLite MLflow store, Optuna journal "
        "file); per trial: its cycle in the running sweep (previous trial's end -> its end: ask, compose, "
        "launch, train(), tell) minus its training (train_one_epoch) and evaluation (evaluate) compute. The "
        "first trial of each sweep (first imports, first connections) is reported apart; 'part' rows split "
        "the overhead by where it goes (probes around train()'s calls).",
    )
    fig4.metrics["per-trial overhead"] = summary([r["overhead_s"] for r in steady], "s")
    fig4.metrics["  inside train()"] = summary([r["inside_train_s"] for r in steady], "s")
    fig4.metrics["  outside train() (sweeper, launcher, compose)"] = summary(
        [r["outside_train_s"] for r in steady], "s"
    )
    fig4.metrics["per-trial overhead without checkpoint writes"] = summary(
        [r["overhead_s"] - r["parts"].get("checkpoint", 0.0) for r in steady], "s"
    )
    fig4.metrics["first trial's overhead (first imports and connections)"] = summary(
        [r["overhead_s"] for r in rows if r["first"]], "s"
    )
    labels = sorted({k for r in steady for k in r["parts"]})
    for label in labels:
        fig4.metrics[f"  part: {label}"] = summary([r["parts"].get(label, 0.0) for r in steady], "s")
    start = startup(ctx)
    fig4.metrics["masksweep-train --help"] = summary(start["train_help_s"], "s")
    fig4.metrics["masksweep --help"] = summary(start["cli_help_s"], "s")
    fig4.details["help_imports_seconds"] = start["import_seconds"]
    fig4.details["trials"] = rows
    median = fig4.metrics["per-trial overhead"]["median"]
    fig4.targets.append(
        Target(
            "per-trial overhead in a running sweep",
            f"<= {OVERHEAD_TARGET_S} s",
            round(median, 3),
            median <= OVERHEAD_TARGET_S,
        )
    )
    fig4.notes.append(
        "Heavy imports during `masksweep-train --help` (cumulative seconds, -X importtime): "
        + ", ".join(f"{k} {v}" for k, v in start["import_seconds"].items())
    )
    return fig3, fig4
