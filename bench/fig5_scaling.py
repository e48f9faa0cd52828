"""Figure 5: scaling.

(a) `masksweep compare` over an MLflow store of N runs (built the way tests/test_compare.py builds its 500-run
    store: ~94 params and 18 metric values per run, nested under one sweep parent): the whole command in a
    subprocess (start-up included), with and without the chart, and the compare() call alone.
(b) Optuna: the sampler and storage cost of one trial at trial 10 vs at the last trial of a TPE study on
    masksweep's default storage (a journal file), with sweeps/tpe.yaml's search space and per-trial storage
    traffic like the sweeper's (ask, suggest six params, five epoch reports with the median pruner, tell, and
    the sweeper's bookkeeping reads).
(c) Evaluation time vs the number of val images: COCOEvaluator on synthetic predictions, and the whole
    `engine.evaluate` with the model.
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Context, Figure, Target, bench_env, interleaved, log, script, summary

COMPARE_TARGET_S = 5.0
FLOOR_TARGET = 1.3  # `masksweep compare` (chart included) / the bare MLflow floor on the same store
# The floor: a process that only imports mlflow and pages MlflowClient.search_runs through the same runs that
# compare shows (the sweep's nested trials), as compare's query does: what no compare can go below while it
# keeps the MLflow client. argv: tracking URI, experiment id, parent run id, expected number of runs.
FLOOR_CODE = """
import sys
from mlflow import MlflowClient

uri, experiment_id, parent, expected = sys.argv[1:]
client = MlflowClient(uri)
runs, token = [], None
while True:
    page = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000, page_token=token
    )
    runs.extend(page)
    token = page.token
    if not token:
        break
assert len(runs) == int(expected), len(runs)
"""


# ------------------------------------------------------------------------------------------ (a) compare
def build_store(root: Path, runs: int) -> tuple[float, str, str]:
    """A store of `runs` trial runs nested under one sweep parent: (seconds, experiment id, parent run id)."""
    from mlflow.entities import Metric, Param

    from masksweep.tracking import default_store, experiment_id, open_client

    uri, artifacts = default_store(root)
    client, _ = open_client(uri)
    exp = experiment_id(client, "masksweep", artifacts)
    tic = time.perf_counter()
    parent = client.create_run(exp, run_name="big", tags={"masksweep.role": "sweep"}).info.run_id
    keys = (
        "val/ap_bbox",
        "val/ap_segm",
        "final/loss_last_epoch",
        "final/loss_classifier_last_epoch",
        "val/iou_global",
    )
    for n in range(runs):
        run = client.create_run(
            exp, run_name=f"trial-{n}", tags={"mlflow.parentRunId": parent, "optuna.trial_number": str(n)}
        ).info.run_id
        params = [Param(f"model.detector.key{j}", str(j)) for j in range(90)]
        params += [
            Param("optimizer._target_", "torch.optim.SGD"),
            Param("lr", str(0.0001 * (n + 1))),
            Param("epochs", "5"),
            Param("optimized_metric", "val/ap_segm"),
        ]
        metrics = [Metric(k, (n % 97) / 100, 0, e) for e in (1, 2, 3) for k in keys]
        metrics += [Metric("train/epoch_loss", 1.0 / e, 0, e) for e in (1, 2, 3)]
        client.log_batch(run, params=params, metrics=metrics)
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return time.perf_counter() - tic, exp, parent


def compare_part(ctx: Context, fig: Figure) -> None:
    from masksweep.compare import compare
    from masksweep.tracking import default_store, open_client

    s = ctx.sizes
    root = ctx.workdir / "fig5-compare"
    root.mkdir(parents=True, exist_ok=True)
    build_s, exp, parent = build_store(root, s.compare_runs)
    log(f"fig5a: built a store of {s.compare_runs} runs in {build_s:.1f}s")
    env = bench_env()
    uri = default_store(root)[0]
    client, _ = open_client(uri, create=False)
    floor = [sys.executable, "-c", FLOOR_CODE, uri, exp, parent, str(s.compare_runs)]
    variants = (
        "command, no chart",
        "command, with chart",
        "floor: import mlflow + search_runs",
        "floor: import mlflow",
        "compare() call",
        "start-up imports",
    )
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _, variant in interleaved(variants, s.compare_repeats):
        tic = time.perf_counter()
        if variant == "compare() call":
            rows = compare(client, fmt="table", out=io.StringIO(), err=io.StringIO())
            assert len(rows) == s.compare_runs, len(rows)
        elif variant.startswith("floor"):
            code = floor if variant.endswith("search_runs") else [sys.executable, "-c", "import mlflow"]
            subprocess.run(code, cwd=root, env=env, capture_output=True, timeout=600, check=True)
        elif variant == "start-up imports":  # what the command imports before it reads anything
            code = "import masksweep.cli, masksweep.compare, mlflow, mlflow.store.tracking.sqlalchemy_store"
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, timeout=600, check=True
            )
        else:
            command = [script("masksweep"), "compare", "--output", str(root / "table.txt")]
            command += (
                ["--no-chart"] if variant == "command, no chart" else ["--chart", str(root / "chart.png")]
            )
            subprocess.run(command, cwd=root, env=env, capture_output=True, timeout=600, check=True)
        seconds[variant].append(time.perf_counter() - tic)
    log(f"fig5a: {seconds}")
    for variant in variants:
        fig.metrics[f"compare {s.compare_runs} runs: {variant}"] = summary(seconds[variant], "s")
    worst = max(statistics.median(seconds[v]) for v in variants[:2])
    fig.targets.append(
        Target(
            f"`masksweep compare` over {s.compare_runs} runs (whole command, chart included)",
            f"<= {COMPARE_TARGET_S} s",
            round(worst, 2),
            worst <= COMPARE_TARGET_S,
        )
    )
    # Ratios within a repeat (the variants of one repeat ran back to back): the machine's load cancels out.
    ratios = [
        chart / bare
        for chart, bare in zip(
            seconds["command, with chart"], seconds["floor: import mlflow + search_runs"], strict=True
        )
    ]
    fig.metrics[f"compare {s.compare_runs} runs: command with chart / floor"] = summary(ratios, "x")
    fig.metrics[f"compare {s.compare_runs} runs: command without chart / floor"] = summary(
        [
            a / b
            for a, b in zip(
                seconds["command, no chart"], seconds["floor: import mlflow + search_runs"], strict=True
            )
        ],
        "x",
    )
    median_ratio = statistics.median(ratios)
    fig.targets.append(
        Target(
            f"`masksweep compare` over {s.compare_runs} runs (chart included) / the bare MLflow floor",
            f"<= {FLOOR_TARGET}x",
            round(median_ratio, 3),
            median_ratio <= FLOOR_TARGET,
        )
    )
    fig.details["compare_store_build_s"] = round(build_s, 1)


# ------------------------------------------------------------------------------------------ (b) Optuna
def tpe_study(root: Path, name: str, trials: int) -> tuple[list[float], dict[str, list[float]]]:
    """One seeded TPE study of `trials` trials: the seconds each trial costs in sampler and storage."""
    import warnings

    import optuna

    from masksweep.study import storage as _backend

    spec = _backend.parse_storage(None, study_name=name, cwd=root)
    storage = _backend.open_storage(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=42, n_startup_trials=4)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner
    )
    per_trial: list[float] = []
    parts: dict[str, list[float]] = {"ask+suggest": [], "reports": [], "tell+bookkeeping": []}
    for _ in range(trials):
        t0 = time.perf_counter()
        study.get_trials(deepcopy=False)  # the sweeper's budget check under the ask lock
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"])
        trial.suggest_categorical("scheduler", ["steplr", "cosine"])
        momentum = trial.suggest_float("momentum", 0.8, 0.99)
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
        epochs = trial.suggest_int("epochs", 3, 5)
        t1 = time.perf_counter()
        value = 0.0
        for epoch in range(1, 6):
            value = min(1.0, (epoch / 5) * (1 - abs(lr - 3e-3) * 50) * momentum + wd)
            trial.report(value, epoch)
            if epoch >= epochs or trial.should_prune():
                break
        t2 = time.perf_counter()
        study.tell(trial, value)
        study.get_trials(deepcopy=False)  # _check_failure_rate
        study.get_trials(deepcopy=False)  # _log_progress
        t3 = time.perf_counter()
        per_trial.append(t3 - t0)
        parts["ask+suggest"].append(t1 - t0)
        parts["reports"].append(t2 - t1)
        parts["tell+bookkeeping"].append(t3 - t2)
    return per_trial, parts


def tpe_part(ctx: Context, fig: Figure) -> None:
    import optuna

    s = ctx.sizes
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = ctx.workdir / "fig5-optuna"
    root.mkdir(parents=True, exist_ok=True)
    repeats = 1 if ctx.smoke else 2  # separate studies: a noisy spell hits one study's window, not both
    runs = [tpe_study(root, f"bench-tpe-{r}", s.tpe_trials) for r in range(repeats)]
    w = s.tpe_window
    early = slice(max(0, 10 - w), 10 + w + 1)
    late = slice(max(0, s.tpe_trials - 2 * w - 1), s.tpe_trials)
    last = s.tpe_trials - 1 - w
    pooled_early = [x * 1000 for per_trial, _ in runs for x in per_trial[early]]
    pooled_late = [x * 1000 for per_trial, _ in runs for x in per_trial[late]]
    fig.metrics["Optuna TPE cost per trial @ trial 10"] = summary(pooled_early, "ms")
    fig.metrics[f"Optuna TPE cost per trial @ trial {last}"] = summary(pooled_late, "ms")
    growth = statistics.median(pooled_late) / statistics.median(pooled_early)
    fig.metrics[f"Optuna cost growth, trial {last} / trial 10"] = summary([growth], "x")
    for name in runs[0][1]:
        early_part = [x for _, parts in runs for x in parts[name][early]]
        late_part = [x for _, parts in runs for x in parts[name][late]]
        fig.details[f"optuna_{name}_ms_trial10"] = round(statistics.median(early_part) * 1000, 2)
        fig.details[f"optuna_{name}_ms_trial{last}"] = round(statistics.median(late_part) * 1000, 2)
    fig.details["optuna_per_trial_ms"] = [[round(x * 1000, 2) for x in per_trial] for per_trial, _ in runs]
    fig.details["optuna_storage"] = "journal file (masksweep's default), mlruns/optuna/<study>.journal"


# ------------------------------------------------------------------------------------------ (c) evaluation
def _linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def eval_scaling_part(ctx: Context, fig: Figure) -> None:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench.evalref import synthetic_outputs
    from bench.fig2_eval import val_items
    from masksweep import engine
    from masksweep.data import build_datasets
    from masksweep.metrics import COCOEvaluator
    from masksweep.train import make_loader, seed_everything

    s = ctx.sizes
    # Evaluator alone: up to 100 distinct images, cycled under new image ids beyond that.
    base = val_items(ctx, s.eval_image_size, min(100, max(s.scaling_images)))
    base_outputs = [synthetic_outputs(t, seed=int(t["image_id"])) for _, t in base]
    sizes = list(s.scaling_images)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    warm = COCOEvaluator()  # first use imports faster-coco-eval and scipy: not part of any size's time
    warm.process([base[0][1]], [base_outputs[0]])
    warm.evaluate()
    for _, n in interleaved(sizes, max(s.scaling_repeats, 5)):  # ~2 s a round: cheap to repeat
        targets = [dict(base[i % len(base)][1], image_id=i + 1) for i in range(n)]
        outputs = [base_outputs[i % len(base)] for i in range(n)]
        evaluator = COCOEvaluator()
        tic = time.perf_counter()
        evaluator.process(targets, outputs)
        evaluator.evaluate()
        seconds[n].append(time.perf_counter() - tic)
    # The fit uses each size's fastest repeat: the intrinsic cost; noisy neighbours only ever add time.
    best = [min(seconds[n]) for n in sizes]
    fit = _linear_fit([float(n) for n in sizes], best)
    for n in sizes:
        fig.metrics[f"evaluator (process+AP), {n} images"] = summary(
            [t / n * 1000 for t in seconds[n]], "ms/image"
        )
    fig.metrics["evaluator linear fit R^2 (fastest repeat per size)"] = summary([fit["r2"]], "")
    fig.details["evaluator_fit"] = {k: round(v, 6) for k, v in fit.items()}
    fig.details["evaluator_per_image_ratio_largest_vs_smallest"] = round(
        (best[-1] / sizes[-1]) / (best[0] / sizes[0]), 3
    )

    # The whole evaluate (model inference included).
    count = max(s.scaling_model_images)
    cfg = ctx.compose(f"data.image_size={s.eval_image_size}", f"data.num_val={count}", "data.num_train=1")
    generator = seed_everything(cfg.seed)
    val_set = build_datasets(cfg.data).val
    for index in range(len(val_set)):
        val_set[index]
    device = ctx.torch_device()
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    evaluator = COCOEvaluator()
    model_sizes = [n for n in s.scaling_model_images if n <= len(val_set)]
    loaders = {
        n: make_loader(torch.utils.data.Subset(val_set, range(n)), cfg, train=False, generator=generator)
        for n in model_sizes
    }
    engine.evaluate(model, loaders[model_sizes[0]], device, evaluator)  # warm-up
    whole: dict[int, list[float]] = {n: [] for n in model_sizes}
    for _, n in interleaved(model_sizes, s.scaling_repeats):
        ctx.sync()
        tic = time.perf_counter()
        engine.evaluate(model, loaders[n], device, evaluator)
        ctx.sync()
        whole[n].append(time.perf_counter() - tic)
    fit = _linear_fit([float(n) for n in model_sizes], [min(whole[n]) for n in model_sizes])
    for n in model_sizes:
        fig.metrics[f"engine.evaluate, {n} images"] = summary([t / n * 1000 for t in whole[n]], "ms/image")
    fig.metrics["engine.evaluate linear fit R^2 (fastest repeat per size)"] = summary([fit["r2"]], "")
    fig.details["evaluate_fit"] = {k: round(v, 6) for k, v in fit.items()}
    log(f"fig5c: evaluator {seconds}; evaluate {whole}")


def run(ctx: Context) -> Figure:
    s = ctx.sizes
    fig = Figure(
        "5",
        "Scaling",
        f"(a) `masksweep compare` over {s.compare_runs} runs, {s.compare_repeats} interleaved repeats; "
        f"(b) TPE (seed 42, 4 startup trials) + median pruner, {s.tpe_trials} trials on a journal file; "
        f"(c) evaluation at {s.eval_image_size}px: COCOEvaluator on {list(s.scaling_images)} images "
        f"(synthetic predictions, 30/image), engine.evaluate with the tiny model on "
        f"{list(s.scaling_model_images)} images, {s.scaling_repeats} interleaved repeats",
    )
    compare_part(ctx, fig)
    tpe_part(ctx, fig)
    eval_scaling_part(ctx, fig)
    growth_key = next(k for k in fig.metrics if k.startswith("Optuna cost growth"))
    end = growth_key.split("trial ")[1].split(" ")[0]
    d = fig.details
    fig.notes.append(
        f"TPE: {fig.metrics[growth_key]['median']:.1f}x the per-trial cost at the end of the study vs at "
        "trial 10. Median ms per trial at trial 10 -> at the end: "
        + ", ".join(
            f"{name} {d[f'optuna_{name}_ms_trial10']} -> {d[f'optuna_{name}_ms_trial{end}']}"
            for name in ("ask+suggest", "reports", "tell+bookkeeping")
        )
        + " (ask+suggest is TPE fitting its Parzen estimators on the finished trials; reports include the "
        "median pruner's look at every finished trial's curve; the journal storage replays only new lines)."
    )
    fit = fig.details["evaluator_fit"]
    ratio = fig.details["evaluator_per_image_ratio_largest_vs_smallest"]
    model_fit = fig.details["evaluate_fit"]
    fig.notes.append(
        f"Evaluation time vs images: the evaluator (process + AP) fits a line with R^2 {fit['r2']:.3f} "
        f"({fit['slope'] * 1000:.2f} ms per image, {fit['intercept'] * 1000:.0f} ms fixed), per-image cost "
        f"at the largest vs the smallest size {ratio}x; the whole engine.evaluate (inference included) R^2 "
        f"{model_fit['r2']:.3f}, {model_fit['slope'] * 1000:.0f} ms per image"
        + (": linear." if fit["r2"] > 0.95 and 0.7 < ratio < 1.4 and model_fit["r2"] > 0.95 else ".")
    )
    return fig
