"""`masksweep compare`: the report's two tables (hyperparameters, results) built from MLflow.

Runs come from `MlflowClient.search_runs` (one paged query: params, tags and the latest metric values), never
from the store's files. A sweep is shown as its whole Optuna study (every run tagged with its study name,
whichever parent run it nested under). Metric histories are read only for the chart: every trial's per-step
`train/loss`, in one bulk query on a SQL store.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masksweep.errors import TrackingError
from masksweep.tracking.runs import find_run, quoted
from masksweep.tracking.store import RetryingClient, metric_histories
from masksweep.tracking.tags import (
    TAG_ERROR,
    TAG_EVAL_IMAGES,
    TAG_REQUEUES,
    TAG_RETRIED_AS,
    TAG_ROLE,
    TAG_STUDY_NAME,
    TAG_TRIAL_NAME,
    TAG_TRIAL_NUMBER,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_EXPERIMENT = "masksweep"
DEFAULT_METRIC = "val/ap_segm"
PARENT_TAG = "mlflow.parentRunId"
FORMATS = ("table", "markdown", "csv")
LOSS_KEY = "train/loss"  # per step (every log_every_n_steps, and up to the step a stopped trial stopped at)
MAX_LABELLED = 10  # loss curves named in the legend (the best trials, and every stopped one); all are drawn
MAX_BARS = 30

# (column, param) and (column, metric): the report's tables.
HYPER_COLUMNS = (
    ("Optimizer", "optimizer._target_"),
    ("Scheduler", "scheduler.lr_scheduler._target_"),
    ("lr", "lr"),
    ("Momentum", "momentum"),
    ("Weight decay", "weight_decay"),
    ("Epochs", "epochs"),
)
RESULT_COLUMNS = (
    ("AP bbox", "val/ap_bbox"),
    ("AP segm", "val/ap_segm"),
    ("Loss (last epoch)", "final/loss_last_epoch"),
    ("Loss classifier (last epoch)", "final/loss_classifier_last_epoch"),
    ("Global IoU", "val/iou_global"),
)
# The held-out test split's scores (logged to the study's best trial): beside val's when any run has them.
TEST_COLUMNS = (
    ("AP bbox (test)", "test/ap_bbox"),
    ("AP segm (test)", "test/ap_segm"),
    ("Global IoU (test)", "test/iou_global"),
)
STATUS_COLUMNS = ("Status", "Stop reason", "Stop step")
# (column, tag): where each trial ran (masksweep.study.jobs.job_tags), shown with --jobs.
JOB_COLUMNS = (
    ("SLURM job", "slurm.job_id"),
    ("Node", "slurm.node"),
    ("Requeues", TAG_REQUEUES),
    ("Log", "masksweep.log_file"),
)
SUBSET_MARK = "*"  # after a trial whose AP covers only part of the val split
OUTCOMES = ("finished", "pruned", "diverged", "interrupted", "killed", "failed", "running")
NUMERIC_COLUMNS = {
    *(name for name, _ in RESULT_COLUMNS + TEST_COLUMNS),
    "lr",
    "Momentum",
    "Weight decay",
    "Epochs",
    "Stop step",
}


@dataclass
class Selection:
    experiment_id: str
    experiment_name: str
    description: str  # e.g. "study foo (parent run 3f2a...)", "sweep sweep-foo (3f2a...)" or "all runs"
    sweep_run_id: str | None = None
    study_name: str | None = None
    compute: dict[str, float] = field(default_factory=dict)  # the parent's compute.* metrics


@dataclass
class Row:
    run_id: str
    label: str
    hyper: dict[str, str]  # column -> displayed value
    metrics: dict[str, float | None]  # metric key -> latest value
    status: str
    stop_kind: str = ""
    stop_reason: str = ""
    stop_step: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        if self.stop_kind:
            return f"{self.stop_kind}: {self.stop_reason}" if self.stop_reason else self.stop_kind
        return self.extra.get("error", "")

    @property
    def status_label(self) -> str:
        if self.stop_kind:
            return f"{self.status} ({self.stop_kind})"
        if "retried_as" in self.extra:
            return f"{self.status} (retried as #{self.extra['retried_as']})"
        return self.status

    @property
    def outcome(self) -> str:
        """What the counts line groups by: finished, pruned, diverged, failed, running, ..."""
        if self.stop_kind:
            return self.stop_kind
        return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}.get(
            self.status, self.status.lower()
        )


# -------------------------------------------------------------------------------------------- selecting runs


def _search_all(client: RetryingClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            max_results=5000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client: RetryingClient, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(
            f"experiment {name!r} not found in {client.tracking_uri}; existing: {', '.join(names) or 'none'}"
        )
    return experiment


def select_runs(
    client: RetryingClient, experiment: str | None = None, sweep: str | None = None, all_runs: bool = False
) -> tuple[Selection, list[Run]]:
    """The trial runs to compare.

    --sweep ID: that parent run's study (or, for a sweep without an Optuna study, its nested trials). --all:
    every trial run of the experiment. Default: what ran last. When the experiment's most recent run belongs
    to a sweep (or is one), that sweep's study; else every trial run of the experiment (so `masksweep compare`
    right after `masksweep-train` shows that run).

    A study is selected by its name (tag optuna.study_name), not through one parent run: its record may span
    several parents (a rerun, workers of an older version), and its best trial must be in the table.
    """
    if sweep is not None:
        parent = find_run(client, sweep)  # a whole id or a unique prefix
        exp = client.get_experiment(parent.info.experiment_id)
        if experiment is not None and exp.name != experiment:
            raise TrackingError(f"run {sweep!r} belongs to experiment {exp.name!r}, not {experiment!r}")
        found = _sweep_runs(client, exp.experiment_id, parent) if parent.data.tags.get(TAG_ROLE) else None
        if found is None:
            raise TrackingError(f"run {sweep!r} has no nested trial runs; pass the parent run id of a sweep")
        return _with_compute(client, Selection(exp.experiment_id, exp.name, *found[0])), found[1]

    exp = _experiment(client, experiment or DEFAULT_EXPERIMENT)
    if not all_runs:
        latest = client.search_runs(
            [exp.experiment_id], "", max_results=1, order_by=["attributes.start_time DESC"]
        )
        found = _sweep_runs(client, exp.experiment_id, latest[0]) if latest else None
        if (
            found is not None
        ):  # only the sweep's trials are read, however many other runs the experiment holds
            return _with_compute(client, Selection(exp.experiment_id, exp.name, *found[0])), found[1]
    trials = [r for r in _search_all(client, exp.experiment_id) if r.data.tags.get(TAG_ROLE) != "sweep"]
    if not trials:
        raise TrackingError(f"experiment {exp.name!r} has no runs yet (run masksweep-train first)")
    return Selection(exp.experiment_id, exp.name, f"all {len(trials)} runs"), trials


def _with_compute(client: RetryingClient, selection: Selection) -> Selection:
    """The study's compute (device-hours, hours saved, slot utilization), logged to its parent at its end."""
    if selection.sweep_run_id is not None:
        metrics = client.get_run(selection.sweep_run_id).data.metrics
        prefix = "compute."
        selection.compute = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    return selection


def _sweep_runs(
    client: RetryingClient, experiment_id: str, run: Run
) -> tuple[tuple[str, str | None, str | None], list[Run]] | None:
    """((description, parent run id, study name), trial runs) of the sweep `run` is (or is a trial of); None
    when it is neither a sweep nor one's trial, or the sweep has no trials yet."""
    tags = run.data.tags
    is_parent = tags.get(TAG_ROLE) == "sweep"
    parent_id = run.info.run_id if is_parent else tags.get(PARENT_TAG)
    study = tags.get(TAG_STUDY_NAME)
    if study:
        runs = _search_all(client, experiment_id, f"tags.`{TAG_STUDY_NAME}` = '{quoted(study)}'")
        parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"]
        trials = [r for r in runs if r.data.tags.get(TAG_ROLE) != "sweep"]
        if trials:
            if parent_id is None and parents:
                parent_id = parents[0].info.run_id
            where = f"parent run {parent_id}" if len(parents) <= 1 else f"{len(parents)} parent runs"
            return (f"study {study} ({where})", parent_id, study), trials
    if parent_id is None:
        return None
    children = _children(client, experiment_id, parent_id)
    if not children:
        return None
    parent = run if is_parent else client.get_run(parent_id)
    return (_sweep_description(parent), parent_id, None), children


def _children(client: RetryingClient, experiment_id: str, parent_id: str) -> list[Run]:
    return _search_all(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")


def _sweep_description(parent: Run) -> str:
    return f"sweep {parent.info.run_name or ''} ({parent.info.run_id})".replace("  ", " ")


# ------------------------------------------------------------------------------------------------------ rows


def _class_name(target: str | None) -> str:
    if target is None or target in ("None", "null", ""):
        return "none"
    return target.rsplit(".", 1)[-1]


def _param(params: dict[str, str], key: str) -> str:
    value = params.get(key)
    if value is None:
        return ""
    return "none" if value in ("None", "null") else value


def _label(run: Run) -> str:
    """The report's trial name next to Optuna's number (`trial4 (#3)`), whichever the run has."""
    tags = run.data.tags
    name, number = tags.get(TAG_TRIAL_NAME), tags.get(TAG_TRIAL_NUMBER)
    if name and number is not None:
        return f"{name} (#{number})"
    if name:
        return name
    if number is not None:
        return f"#{number}"
    return run.info.run_name or run.info.run_id[:8]


def optimized_metric(runs: Sequence[Run]) -> str:
    counts = Counter(r.data.params["optimized_metric"] for r in runs if r.data.params.get("optimized_metric"))
    return counts.most_common(1)[0][0] if counts else DEFAULT_METRIC


def build_rows(runs: Sequence[Run], metric: str | None = None) -> list[Row]:
    """One row per run, sorted by the optimized metric (best first; runs without it last)."""
    metric = metric or optimized_metric(runs)
    rows = []
    for run in runs:
        params, tags, values = run.data.params, run.data.tags, run.data.metrics
        scheduler = params.get("scheduler.lr_scheduler._target_", params.get("scheduler.lr_scheduler"))
        hyper = {
            "Optimizer": _class_name(params["optimizer._target_"]) if "optimizer._target_" in params else "",
            "Scheduler": _class_name(scheduler) if scheduler is not None else "",
            "lr": _param(params, "lr"),
            "Momentum": _param(params, "momentum"),
            "Weight decay": _param(params, "weight_decay"),
            "Epochs": _param(params, "epochs"),
        }
        keys = {key for _, key in RESULT_COLUMNS + TEST_COLUMNS} | {metric}
        row = Row(
            run_id=run.info.run_id,
            label=_label(run),
            hyper=hyper,
            metrics={key: values.get(key) for key in keys},
            status=run.info.status,
            stop_kind=tags.get("stop.kind", ""),
            stop_reason=tags.get("stop.reason", ""),
            stop_step=tags.get("stop.step", ""),
        )
        if TAG_ERROR in tags:
            row.extra["error"] = tags[TAG_ERROR]
        if TAG_RETRIED_AS in tags:
            row.extra["retried_as"] = tags[TAG_RETRIED_AS]
        if TAG_EVAL_IMAGES in tags:
            row.extra["eval_images"] = tags[TAG_EVAL_IMAGES]
        row.extra["job"] = {column: tags.get(tag, "") for column, tag in JOB_COLUMNS}
        row.extra["start_time"] = run.info.start_time or 0
        rows.append(row)

    def key(row: Row) -> tuple:
        value = row.metrics.get(metric)
        missing = value is None or math.isnan(value)
        return (missing, -(value or 0.0) if not missing else 0.0, row.label, row.extra["start_time"])

    rows.sort(key=key)
    counts = Counter(r.label for r in rows)
    for row in rows:  # the same trial run twice: tell the rows apart
        if counts[row.label] > 1:
            row.label = f"{row.label} ({row.run_id[:8]})"
    return rows


def _is_subset(row: Row) -> bool:
    """Whether the run's AP covers less than its val split: the tracker's tag reads e.g. "2 of 10"."""
    parts = row.extra.get("eval_images", "").split(" of ")
    return len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1])


# ------------------------------------------------------------------------------------------------- rendering


def format_number(value: float | None) -> str:
    """Four decimals, or scientific notation for huge/tiny values (a diverged loss)."""
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def hyper_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["Trial", *(name for name, _ in HYPER_COLUMNS), "Run ID"]
    return header, [[r.label, *(r.hyper[name] for name, _ in HYPER_COLUMNS), r.run_id] for r in rows]


def result_columns(rows: Sequence[Row]) -> tuple[tuple[str, str], ...]:
    """The results table's (column, metric): val's, with each test/* score beside its val one when logged."""
    present = {key for _, key in TEST_COLUMNS if any(r.metrics.get(key) is not None for r in rows)}
    columns: list[tuple[str, str]] = []
    for name, key in RESULT_COLUMNS:
        columns.append((name, key))
        test_key = "test/" + key.removeprefix("val/")
        columns.extend(column for column in TEST_COLUMNS if column[1] == test_key and test_key in present)
    return tuple(columns)


def counts_line(rows: Sequence[Row]) -> str:
    """`7 runs: 4 finished, 1 pruned, 1 diverged, 1 failed (1 retried)`: every attempt, failures included."""
    counts = Counter(r.outcome for r in rows)
    retried = sum("retried_as" in r.extra for r in rows)  # a dead worker's attempt (it ended FAILED)
    known = [k for k in OUTCOMES if k in counts] + sorted(set(counts) - set(OUTCOMES))
    parts = [
        f"{counts[k]} {k}" + (f" ({retried} retried)" if k == "failed" and retried else "") for k in known
    ]
    return f"{len(rows)} runs: " + ", ".join(parts)


def compute_line(selection: Selection) -> str:
    """`compute: 1.2 device-hours spent, 0.4 saved by pruning and divergence, slot utilization 0.93`."""
    c = selection.compute
    if "device_hours" not in c:
        return ""
    line = f"compute: {c['device_hours']:.3g} device-hours spent"
    line += f", {c.get('saved_device_hours', 0.0):.3g} saved by pruning and divergence"
    if "slot_utilization" in c:
        line += f", slot utilization {c['slot_utilization']:.2f}"
    return line


def jobs_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Where each trial ran: its SLURM job, node and requeues, and its log file (`--jobs`)."""
    header = ["Trial", *(column for column, _ in JOB_COLUMNS)]
    return header, [[r.label, *(r.extra["job"][column] for column, _ in JOB_COLUMNS)] for r in rows]


def subset_footnote(rows: Sequence[Row]) -> str:
    """The note under the results for trials scored on part of the val split ("" when there are none)."""
    subsets = [f"{r.label} ({r.extra['eval_images']})" for r in rows if _is_subset(r)]
    if not subsets:
        return ""
    return (
        f"{SUBSET_MARK} AP over part of the val images (trainer.limit_val_batches), not comparable with "
        f"whole-split runs: {', '.join(subsets)}"
    )


def results_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    columns = result_columns(rows)
    header = ["Trial", *(name for name, _ in columns), *STATUS_COLUMNS]
    body = [
        [
            r.label + (SUBSET_MARK if _is_subset(r) else ""),
            *(format_number(r.metrics.get(key)) for _, key in columns),
            r.status_label,
            _short(r.reason),
            r.stop_step,
        ]
        for r in rows
    ]
    return header, body


def render_markdown(rows: Sequence[Row], selection: Selection, metric: str) -> str:
    def table(header: list[str], body: list[list[str]]) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, body)])

    title = f"experiment {selection.experiment_name}, {selection.description}, sorted by {metric}"
    title += f"; {counts_line(rows)}"
    if compute_line(selection):
        title += f"; {compute_line(selection)}"
    footnote = subset_footnote(rows)
    return (
        f"## Hyperparameters\n\n_{title}_\n\n{table(*hyper_table(rows))}\n\n"
        f"## Results\n\n{table(*results_table(rows))}\n" + (f"\n{footnote}\n" if footnote else "")
    )


def csv_header(columns: Sequence[tuple[str, str]]) -> list[str]:
    return [
        "Trial",
        "Run ID",
        *(name for name, _ in HYPER_COLUMNS),
        *(name for name, _ in columns),
        "Status",
        "Stop kind",
        "Stop reason",
        "Stop step",
        "Error",
        "Val images scored",
    ]


def render_csv(rows: Sequence[Row]) -> str:
    """One flat table (both of the report's tables side by side), metrics at full precision."""
    columns = result_columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(columns))
    for r in rows:
        values = [r.metrics.get(key) for _, key in columns]
        writer.writerow(
            [
                r.label,
                r.run_id,
                *(r.hyper[name] for name, _ in HYPER_COLUMNS),
                *("" if v is None else repr(v) for v in values),
                r.status,
                r.stop_kind,
                r.stop_reason,
                r.stop_step,
                r.extra.get("error", ""),
                r.extra.get("eval_images", ""),
            ]
        )
    return out.getvalue()


def render_table(rows: Sequence[Row], selection: Selection, metric: str, console, jobs: bool = False) -> None:
    from rich.table import Table

    caption = f"experiment {selection.experiment_name}, {selection.description}, sorted by {metric}"
    caption += f"\n{counts_line(rows)}"
    if compute_line(selection):
        caption += f"\n{compute_line(selection)}"
    footnote = subset_footnote(rows)
    if footnote:
        caption += f"\n{footnote}"
    tables = [("Hyperparameters", hyper_table(rows)), ("Results", results_table(rows))]
    if jobs:
        tables.append(("Jobs", jobs_table(rows)))
    for title, (header, body) in tables:
        table = Table(title=title, caption=caption if title == "Results" else None, title_justify="left")
        for name in header:
            numeric = name in NUMERIC_COLUMNS
            table.add_column(
                name,
                justify="right" if numeric else "left",
                # Off a terminal (a file, a pipe: 200 columns) the tables fit unwrapped, and rich's word
                # wrapping of every cell is a quarter of their rendering time over a 500-trial sweep.
                no_wrap=name in ("Run ID", "Trial") or not console.is_terminal,
                overflow="fold",
            )
        for cells in body:
            table.add_row(*cells)
        console.print(table)


# ----------------------------------------------------------------------------------------------------- chart


@dataclass
class Curves:
    """What the loss chart draws: every trial that logged a finite loss, in the rows' order (best first)."""

    points: dict[str, list[tuple[int, float]]]  # label -> [(step, loss)]
    named: list[str]  # the labels the legend shows: the best MAX_LABELLED and the first MAX_LABELLED stopped
    marks: list[tuple[int, float]]  # each stopped trial's last point: the value it stopped at (or the last
    # finite one before it)


def loss_curves(rows: Sequence[Row], histories: dict[str, list]) -> Curves:
    curves = Curves({}, [], [])
    stopped = 0
    for rank, row in enumerate(rows):
        points = [(m.step, m.value) for m in histories.get(row.run_id, ()) if math.isfinite(m.value)]
        if not points:
            continue
        curves.points[row.label] = points
        if row.stop_kind:
            curves.marks.append(points[-1])
            stopped += 1
        if rank < MAX_LABELLED or (row.stop_kind and stopped <= MAX_LABELLED):
            curves.named.append(row.label)
    return curves


def write_chart(
    client: RetryingClient, rows: Sequence[Row], path: Path, selection: Selection, metric: str
) -> Path:
    """Left: every trial's per-step training loss (`train/loss`); a stopped trial's curve (pruned, diverged,
    killed) ends in a mark at the step it stopped at; the best MAX_LABELLED trials and the first stopped ones
    are named. Right: AP bbox/segm per trial."""
    from concurrent.futures import ThreadPoolExecutor

    bars = rows[:MAX_BARS]
    # The histories load (one bulk query on a SQL store) while matplotlib imports. The chart uses matplotlib's
    # object API, not pyplot: no GUI backend machinery to import, and nothing global to close.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(metric_histories, client, [row.run_id for row in rows], LOSS_KEY)
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        histories = pending.result()
    width, height = 13.0, max(4.5, 0.28 * len(bars) + 1.5)
    fig = Figure(figsize=(width, height))
    # Margins from the longest trial label rather than tight_layout(): that draws the whole figure once more
    # to measure every tick label, which was 40% of the chart's time over a 500-trial sweep.
    label_in = 0.075 * max((len(r.label) for r in bars), default=4) + 0.2  # at fontsize "small"
    fig.subplots_adjust(
        left=0.7 / width,
        right=0.98,
        bottom=0.55 / height,
        top=1 - 0.75 / height,
        wspace=(label_in + 0.6) / (width / 2),
    )
    ax_loss, ax_ap = fig.subplots(1, 2)
    curves = loss_curves(rows, histories)
    lines = {}
    for label in reversed(curves.named):  # the best drawn last, on top
        steps, values = zip(*curves.points[label], strict=True)
        (lines[label],) = ax_loss.plot(steps, values, linewidth=1.2)
    handles, names = [lines[label] for label in curves.named], list(curves.named)
    background = [points for label, points in curves.points.items() if label not in lines]
    if background:  # one artist for the unnamed trials: hundreds of curves draw at once
        ax_loss.add_collection(LineCollection(background, colors="0.6", linewidths=0.6, alpha=0.5))
        ax_loss.autoscale_view()
        handles, names = [*handles, Line2D([], [], color="0.6")], [*names, f"{len(background)} others"]
    if curves.marks:
        steps, values = zip(*curves.marks, strict=True)
        handles.append(ax_loss.scatter(steps, values, marker="X", s=70, color="black", zorder=3))
        names.append("stopped (pruned, diverged, killed)")
    ax_loss.set(
        xlabel="step",
        ylabel=f"{LOSS_KEY} (per step)",
        title=f"training loss per step, {len(curves.points)} of {len(rows)} trials",
    )
    if curves.points:
        if min(v for points in curves.points.values() for _, v in points) > 0:
            ax_loss.set_yscale("log")  # a diverged trial's losses span orders of magnitude
        ax_loss.legend(handles, names, fontsize="small", ncol=1 if len(handles) <= 12 else 2)
    else:
        ax_loss.text(0.5, 0.5, f"no {LOSS_KEY} logged", ha="center", va="center", transform=ax_loss.transAxes)

    labels = [r.label for r in bars][::-1]
    positions = list(range(len(bars)))
    height = 0.4
    series = (("AP bbox", "val/ap_bbox"), ("AP segm", "val/ap_segm"))
    for offset, (name, key) in zip((-height / 2, height / 2), series, strict=True):
        values = [(r.metrics.get(key) or 0.0) for r in bars][::-1]
        ax_ap.barh([p + offset for p in positions], values, height=height, label=name)
    ax_ap.set_yticks(positions, labels, fontsize="small")
    ax_ap.set(
        xlabel="AP",
        xlim=(0, 1),
        title="AP per trial" + (f" (best {MAX_BARS} of {len(rows)})" if len(rows) > MAX_BARS else ""),
    )
    ax_ap.legend(loc="lower right", fontsize="small")
    fig.suptitle(
        f"{selection.experiment_name}: {selection.description} (sorted by {metric})", fontsize="medium"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})  # a quarter of the encoding time
    return path


# ------------------------------------------------------------------------------------------------------ main


def compare(
    client: RetryingClient,
    experiment: str | None = None,
    sweep: str | None = None,
    fmt: str = "table",
    output: Path | None = None,
    chart: Path | None = None,
    all_runs: bool = False,
    jobs: bool = False,
    out=None,
    err=None,
) -> list[Row]:
    """Print (or write) the tables; write the chart when `chart` is set. Returns the rows."""
    import sys

    if fmt not in FORMATS:
        raise TrackingError(f"--format {fmt!r} is invalid; allowed: {', '.join(FORMATS)}")
    out = out or sys.stdout
    err = err or sys.stderr
    selection, runs = select_runs(client, experiment, sweep, all_runs)
    metric = optimized_metric(runs)
    rows = build_rows(runs, metric)
    if fmt == "table":
        from rich.console import Console

        if output is not None:
            with open(output, "w") as handle:
                console = Console(file=handle, width=200, color_system=None)
                render_table(rows, selection, metric, console, jobs)
        else:
            console = Console(file=out, width=None if out.isatty() else 200)
            render_table(rows, selection, metric, console, jobs)
    else:
        text = render_markdown(rows, selection, metric) if fmt == "markdown" else render_csv(rows)
        if output is not None:
            output.write_text(text)
        else:
            out.write(text)
            out.flush()
        print(
            f"{counts_line(rows)}: experiment {selection.experiment_name}, {selection.description}", file=err
        )
    if output is not None:
        print(f"tables written to {output}", file=err)
    if chart is not None and rows:
        print(f"chart written to {write_chart(client, rows, chart, selection, metric)}", file=err)
    return rows
