"""Figure 3b: the compute that pruning and divergence detection save on a wide search, and the best kept.

The real `masksweep-train -m sweep=tpe` (sweeps/tpe.yaml's space: optimizer, scheduler, lr, momentum, weight
decay, epochs) runs on the tiny preset at a size that fits `make bench`, once per sampler seed and side:
- "with": divergence detection on (the default) and PRUNER, the README's pruner for wide searches;
- "without": `divergence=off` and pruner none: every trial runs its whole schedule.
The seeds are the same on both sides and the sides alternate (without, with; with, without; ...), so a slow
spell of the shared machine does not always hit one side. Per seed: the ratio of train steps (MLflow logs
`train/loss` every step here) and the ratio of the best COMPLETE values; then median and range over seeds.

The "without" sweeps record every trial's full per-epoch curve, so Optuna's own pruners are also replayed over
them (fig3_sweep.replay, in the order TPE ran the trials): each setting of PRUNER_GRID is measured on the same
curves, which is how PRUNER was chosen; the real "with" sweeps confirm it (TPE reacts to pruned trials, so a
replay is close to, not equal to, a real pruned search).
"""

from __future__ import annotations

import math
import statistics
import sys
import uuid
from typing import Any

from bench.common import Context, Figure, Target, interleaved, log, summary
from bench.fig3_sweep import best, data_overrides, ensure_pretrained, launch, replay
from bench.report import pruner_label

# The README's recommendation for wide searches, and sweeps/tpe.yaml's pruner: the PRUNER_GRID setting that
# the replay over the "without" curves measured as the best trade-off (bench/results/latest.md, figure 3b).
PRUNER: dict[str, Any] = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}
# Settings replayed (PrunerConfig keys, as `hydra.sweeper.pruner.*` takes them); epochs are reported from 1.
PRUNER_GRID: tuple[dict[str, Any], ...] = (
    {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2},
    {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
    {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
    {"name": "percentile", "percentile": 75.0, "n_startup_trials": 3, "n_warmup_steps": 1},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    {"name": "successive_halving", "min_resource": 2, "reduction_factor": 3},
    {"name": "hyperband", "min_resource": 1, "max_resource": 5, "reduction_factor": 3},
)
STEPS_TARGET = 0.5
BEST_TARGET = 0.97
# Keys sweeps/tpe.yaml sets on its pruner: nulled when the chosen pruner does not take them, so that the
# sweeper does not warn about (and the results do not show) settings that play no part.
TPE_YAML_PRUNER_KEYS = ("min_resource", "reduction_factor")


def pruner_overrides(pruner: dict[str, Any]) -> list[str]:
    keys = [f"hydra.sweeper.pruner.{k}={v}" for k, v in pruner.items()]
    return keys + [f"hydra.sweeper.pruner.{k}=null" for k in TPE_YAML_PRUNER_KEYS if k not in pruner]


def variants() -> dict[str, list[str]]:
    return {
        "with": pruner_overrides(PRUNER),
        "without": ["divergence=off", *pruner_overrides({"name": "none"})],
    }


def search_data(ctx: Context) -> list[str]:
    s = ctx.sizes
    return data_overrides(ctx, s.search_image_size, s.search_num_train, s.search_num_val)


def search_overrides(ctx: Context) -> list[str]:
    s = ctx.sizes
    overrides = search_data(ctx)
    if s.search_epochs is not None:  # smoke: fewer epochs than the space's range(3, 6)
        overrides.append(f"hydra.sweeper.params.epochs='{s.search_epochs}'")  # quoted: not a sweep
    return overrides


def sweep_command(ctx: Context, variant: str, seed: int, study: str) -> list[str]:
    s = ctx.sizes
    return [
        sys.executable,
        "-m",
        "bench.sweep_entry",
        "-m",
        "sweep=tpe",
        f"hydra.sweep.dir={ctx.workdir / 'fig3b' / f'sweep-{variant}-{seed}'}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={s.search_trials}",
        f"hydra.sweeper.sampler.seed={seed}",
        *search_overrides(ctx),
        f"optimized_metric={s.sweep_metric}",
        "trainer.log_every_n_steps=1",  # every step in MLflow: the step counts below are exact
        "trainer.progress=false",
        f"device={ctx.device}",
        *variants()[variant],
    ]


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float("nan")


def replay_settings(without: dict[int, dict[str, Any]], steps_per_epoch: int) -> list[dict[str, Any]]:
    """Every PRUNER_GRID setting replayed on each seed's "without" curves, in the order TPE ran them."""
    rows = []
    for pruner in PRUNER_GRID:
        steps, bests = [], []
        for sweep in without.values():
            trials = [t for t in sweep["trials"] if t["state"] == "COMPLETE" and t["intermediate"]]
            curves = {
                str(t["number"]): [t["intermediate"][k] for k in sorted(t["intermediate"])] for t in trials
            }
            order = tuple(str(t["number"]) for t in trials)
            epochs, winner = replay(curves, order, pruner)
            total = steps_per_epoch * sum(len(c) for c in curves.values())
            steps.append(steps_per_epoch * sum(epochs.values()) / total if total else float("nan"))
            reference = max((c[-1] for c in curves.values()), default=None)
            bests.append(ratio(curves[winner][-1] if winner else None, reference))
        rows.append(
            {
                "pruner": pruner,
                "steps_ratio": summary(steps, "ratio"),
                "best_ratio": summary(bests, "ratio"),
                "meets_both": statistics.median(steps) <= STEPS_TARGET
                and statistics.median(bests) >= BEST_TARGET,
            }
        )
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best trade-off: among settings keeping the best value (median >= BEST_TARGET), the fewest steps;
    if none keeps it, the highest best-value ratio."""
    keeping = [r for r in rows if r["best_ratio"]["median"] >= BEST_TARGET]
    if keeping:
        return min(keeping, key=lambda r: (r["steps_ratio"]["median"], -r["best_ratio"]["median"]))
    return max(rows, key=lambda r: (r["best_ratio"]["median"], -r["steps_ratio"]["median"]))


def run(ctx: Context) -> Figure:
    s = ctx.sizes
    pretrain_s = ensure_pretrained(ctx, search_data(ctx))
    if pretrain_s:
        log(f"fig3b: pretrained the tiny preset once in {pretrain_s:.1f}s (cached, outside every sweep)")
    sweeps: dict[str, dict[int, dict[str, Any]]] = {"without": {}, "with": {}}
    for r, variant in interleaved(("without", "with"), len(s.search_seeds)):
        seed = s.search_seeds[r]
        study = f"bench-tpe-{variant}-{seed}-{uuid.uuid4().hex[:6]}"
        sweep = launch(
            ctx.workdir / "fig3b", f"{variant}-{seed}", sweep_command(ctx, variant, seed, study), study
        )
        sweeps[variant][seed] = sweep
        log(
            f"fig3b: {variant} seed {seed}: {sum(t['steps'] for t in sweep['trials'])} steps, "
            f"{sweep['wall_s']:.0f}s"
        )
    per_seed = []
    for seed in s.search_seeds:
        w, wo = sweeps["with"][seed], sweeps["without"][seed]
        steps_w, steps_wo = (sum(t["steps"] for t in x["trials"]) for x in (w, wo))
        best_w, best_wo = ((best(x["trials"]) or {}).get("value") for x in (w, wo))
        per_seed.append(
            {
                "seed": seed,
                "steps_with": steps_w,
                "steps_without": steps_wo,
                "steps_ratio": round(ratio(steps_w, steps_wo), 4),
                "best_with": best_w,
                "best_without": best_wo,
                "best_ratio": round(ratio(best_w, best_wo), 4),
                "wall_with_s": round(w["wall_s"], 1),
                "wall_without_s": round(wo["wall_s"], 1),
                "pruned_with": sum(t["state"] == "PRUNED" and not t["diverged"] for t in w["trials"]),
                "diverged_with": sum(t["diverged"] for t in w["trials"]),
                "failed": sum(t["state"] == "FAIL" for x in (w, wo) for t in x["trials"]),
            }
        )
    steps_per_epoch = -(-s.search_num_train // 4)  # trainer.batch_size 4
    fig = Figure(
        "3b",
        "Sweep compute saved, TPE search",
        f"sweep=tpe (sweeps/tpe.yaml's space: optimizer, scheduler, lr, momentum, weight_decay, epochs "
        f"{s.search_epochs or 'range(3, 6)'}), {s.search_trials} trials per sweep, TPE sampler seeds "
        f"{list(s.search_seeds)} (same on both sides, sides alternating), tiny preset "
        + (
            f"pretrained once for {s.sweep_pretrain_steps} steps, "
            if s.sweep_pretrain_steps
            else "random init, "
        )
        + f"{s.search_image_size}px synthetic data, {s.search_num_train} train / {s.search_num_val} val "
        f"images ({steps_per_epoch} steps/epoch), optimized_metric={s.sweep_metric}; 'with' = divergence "
        "detection + "
        f"pruner {pruner_label(PRUNER)}; 'without' = divergence=off, pruner none; device {ctx.device}",
    )
    steps_ratios = [p["steps_ratio"] for p in per_seed]
    best_ratios = [p["best_ratio"] for p in per_seed]
    fig.metrics["steps with / without, per seed"] = summary(steps_ratios, "ratio")
    fig.metrics["best value with / without, per seed"] = summary(best_ratios, "ratio")
    fig.metrics["training steps, with"] = summary([p["steps_with"] for p in per_seed], "steps")
    fig.metrics["training steps, without"] = summary([p["steps_without"] for p in per_seed], "steps")
    fig.metrics["best value, with"] = summary([p["best_with"] or 0.0 for p in per_seed], s.sweep_metric)
    fig.metrics["best value, without"] = summary([p["best_without"] or 0.0 for p in per_seed], s.sweep_metric)
    fig.metrics["sweep wall time, with"] = summary([p["wall_with_s"] for p in per_seed], "s")
    fig.metrics["sweep wall time, without"] = summary([p["wall_without_s"] for p in per_seed], "s")
    fig.metrics["wall time with / without, per seed"] = summary(
        [p["wall_with_s"] / p["wall_without_s"] for p in per_seed], "ratio"
    )
    fig.metrics["trials pruned, with"] = summary([p["pruned_with"] for p in per_seed], "trials")
    fig.metrics["trials diverged, with"] = summary([p["diverged_with"] for p in per_seed], "trials")
    steps_median, best_median = statistics.median(steps_ratios), statistics.median(best_ratios)
    fig.targets.append(
        Target(
            "steps with / without (median over seeds)",
            f"<= {STEPS_TARGET}",
            steps_median,
            steps_median <= STEPS_TARGET,
        )
    )
    fig.targets.append(
        Target(
            "best value with / without (median over seeds)",
            f">= {BEST_TARGET}",
            best_median,
            not math.isnan(best_median) and best_median >= BEST_TARGET,
        )
    )
    settings = replay_settings(sweeps["without"], steps_per_epoch)
    chosen = choose(settings)
    fig.details["per_seed"] = per_seed
    fig.details["pruner_replay"] = {"settings": settings, "chosen": chosen["pruner"], "used": PRUNER}
    for variant, by_seed in sweeps.items():
        fig.details[f"trials_{variant}"] = {
            str(seed): [
                {
                    k: v
                    for k, v in t.items()
                    if k in ("number", "params", "state", "value", "steps", "diverged")
                }
                for t in sweep["trials"]
            ]
            for seed, sweep in by_seed.items()
        }
    if pretrain_s:
        fig.details["pretrain_seconds"] = round(pretrain_s, 1)
    fig.notes.append(
        "Steps and best values are deterministic for a seed (seeded trials, same data) up to thread timing; "
        "wall times are one sweep each on a shared 2-core machine where other jobs ran too: compare them "
        "side by side only."
    )
    return fig


def analysis(fig: Figure) -> str | None:
    """Which replayed setting reaches which target, and the trade-off of the one used."""
    replayed = fig.details.get("pruner_replay")
    if not replayed or not fig.targets:
        return None
    rows = replayed["settings"]

    def describe(row: dict[str, Any]) -> str:
        return (
            f"{pruner_label(row['pruner'])}: steps {row['steps_ratio']['median']:.3f} "
            f"[{row['steps_ratio']['min']:.3f} – {row['steps_ratio']['max']:.3f}], best "
            f"{row['best_ratio']['median']:.3f} "
            f"[{row['best_ratio']['min']:.3f} – {row['best_ratio']['max']:.3f}]"
        )

    both = [r for r in rows if r["meets_both"]]
    text = (
        "Replayed on the 'without' curves (median [range] over seeds): "
        + "; ".join(map(describe, rows))
        + ". "
    )
    if both:
        text += f"{len(both)} setting(s) reach both targets; "
    else:
        keep = [r for r in rows if r["best_ratio"]["median"] >= BEST_TARGET]
        half = [r for r in rows if r["steps_ratio"]["median"] <= STEPS_TARGET]
        thriftiest = min(rows, key=lambda r: r["steps_ratio"]["median"])
        text += "No setting reaches both targets: " + (
            f"the ones that halve the steps ({', '.join(pruner_label(r['pruner']) for r in half)}) lose the "
            "best value in some seeds; "
            if half
            else f"none halves the steps (the thriftiest, {pruner_label(thriftiest['pruner'])}, needs "
            f"{thriftiest['steps_ratio']['median']:.3f}); "
        )
        text += (
            f"{len(keep)} of {len(rows)} keep the best value (median) but need more than half the steps; "
            if keep
            else "none keeps the best value; "
        )
    text += f"the best trade-off is {pruner_label(replayed['chosen'])}"
    if replayed["chosen"] != replayed["used"]:
        text += f", not the setting the real 'with' sweeps used ({pruner_label(replayed['used'])})"
    text += (
        ". The real 'with' sweeps differ from the replay in one way: TPE sees the pruned trials and samples "
        "the next ones from them, so the trials after the first pruning are not the same as without."
    )
    return text
