"""`masksweep compare`: the report's two tables (hyperparameters, results) built from MLflow.

Runs come from `MlflowClient.search_runs` (one paged query: params, tags and the latest metric values), never
from the store's files. Metric histories are read only for the chart, and only for its top trials.
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
from masksweep.tracking import TAG_ERROR, TAG_ROLE, TAG_TRIAL_NAME, RetryingClient

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_EXPERIMENT = "masksweep"
DEFAULT_METRIC = "val/ap_segm"
PARENT_TAG = "mlflow.parentRunId"
FORMATS = ("table", "markdown", "csv")
MAX_CURVES = 20  # loss curves drawn (one metric-history call each): the best trials
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
STATUS_COLUMNS = ("Status", "Stop reason", "Stop step")
NUMERIC_COLUMNS = {
    *(name for name, _ in RESULT_COLUMNS),
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
    description: str  # e.g. "sweep sweep-foo (3f2a...)" or "all runs"
    sweep_run_id: str | None = None


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
        return f"{self.status} ({self.stop_kind})" if self.stop_kind else self.status


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


def _get_run(client: RetryingClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run {run_id!r} not found in {client.tracking_uri}") from exc


def select_runs(
    client: RetryingClient, experiment: str | None = None, sweep: str | None = None, all_runs: bool = False
) -> tuple[Selection, list[Run]]:
    """The trial runs to compare.

    --sweep ID: that parent run's nested trials. --all: every trial run of the experiment. Default: what ran
    last. When the experiment's most recent run belongs to a sweep (or is one), that sweep's trials; else
    every trial run of the experiment (so `masksweep compare` right after `masksweep-train` shows that run).
    """
    if sweep is not None:
        parent = _get_run(client, sweep)
        exp = client.get_experiment(parent.info.experiment_id)
        if experiment is not None and exp.name != experiment:
            raise TrackingError(f"run {sweep!r} belongs to experiment {exp.name!r}, not {experiment!r}")
        runs = _children(client, exp.experiment_id, sweep)
        if not runs:
            raise TrackingError(f"run {sweep!r} has no nested trial runs; pass the parent run id of a sweep")
        return Selection(exp.experiment_id, exp.name, _sweep_description(parent), sweep), runs

    exp = _experiment(client, experiment or DEFAULT_EXPERIMENT)
    if not all_runs:
        latest = client.search_runs(
            [exp.experiment_id], "", max_results=1, order_by=["attributes.start_time DESC"]
        )
        if latest:
            tags = latest[0].data.tags
            parent_id = latest[0].info.run_id if tags.get(TAG_ROLE) == "sweep" else tags.get(PARENT_TAG)
            children = _children(client, exp.experiment_id, parent_id) if parent_id else []
            if children:  # only the sweep's trials are read, however many other runs the experiment holds
                parent = latest[0] if parent_id == latest[0].info.run_id else client.get_run(parent_id)
                return Selection(exp.experiment_id, exp.name, _sweep_description(parent), parent_id), children
    trials = [r for r in _search_all(client, exp.experiment_id) if r.data.tags.get(TAG_ROLE) != "sweep"]
    if not trials:
        raise TrackingError(f"experiment {exp.name!r} has no runs yet (run masksweep-train first)")
    return Selection(exp.experiment_id, exp.name, f"all {len(trials)} runs"), trials


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
    tags = run.data.tags
    if tags.get(TAG_TRIAL_NAME):
        return tags[TAG_TRIAL_NAME]
    if tags.get("optuna.trial_number") is not None:
        return f"#{tags['optuna.trial_number']}"
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
        keys = {key for _, key in RESULT_COLUMNS} | {metric}
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


def results_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["Trial", *(name for name, _ in RESULT_COLUMNS), *STATUS_COLUMNS]
    body = [
        [
            r.label,
            *(format_number(r.metrics.get(key)) for _, key in RESULT_COLUMNS),
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
    return (
        f"## Hyperparameters\n\n_{title}_\n\n{table(*hyper_table(rows))}\n\n"
        f"## Results\n\n{table(*results_table(rows))}\n"
    )


CSV_HEADER = [
    "Trial",
    "Run ID",
    *(name for name, _ in HYPER_COLUMNS),
    *(name for name, _ in RESULT_COLUMNS),
    "Status",
    "Stop kind",
    "Stop reason",
    "Stop step",
    "Error",
]


def render_csv(rows: Sequence[Row]) -> str:
    """One flat table (both of the report's tables side by side), metrics at full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        values = [r.metrics.get(key) for _, key in RESULT_COLUMNS]
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
            ]
        )
    return out.getvalue()


def render_table(rows: Sequence[Row], selection: Selection, metric: str, console) -> None:
    from rich.table import Table

    caption = f"experiment {selection.experiment_name}, {selection.description}, sorted by {metric}"
    for title, (header, body) in (("Hyperparameters", hyper_table(rows)), ("Results", results_table(rows))):
        table = Table(title=title, caption=caption if title == "Results" else None, title_justify="left")
        for name in header:
            numeric = name in NUMERIC_COLUMNS
            table.add_column(
                name,
                justify="right" if numeric else "left",
                no_wrap=name in ("Run ID", "Trial"),
                overflow="fold",
            )
        for cells in body:
            table.add_row(*cells)
        console.print(table)


# ----------------------------------------------------------------------------------------------------- chart


def write_chart(
    client: RetryingClient, rows: Sequence[Row], path: Path, selection: Selection, metric: str
) -> Path:
    """Left: train/epoch_loss per epoch for the best MAX_CURVES trials. Right: AP bbox/segm per trial."""
    from concurrent.futures import ThreadPoolExecutor

    curves = rows[:MAX_CURVES]
    bars = rows[:MAX_BARS]
    # One history query per curve, sent at once (the store answers them concurrently) and while matplotlib
    # imports: together they were a third of `compare` over a large sweep.
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending = [pool.submit(client.get_metric_history, row.run_id, "train/epoch_loss") for row in curves]
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        histories = [future.result() for future in pending]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.28 * len(bars) + 1.5)))
    drawn = 0
    for row, unsorted in zip(curves, histories, strict=True):
        history = sorted(unsorted, key=lambda m: m.step)
        if history:
            ax_loss.plot([m.step for m in history], [m.value for m in history], marker="o", label=row.label)
            drawn += 1
    ax_loss.set(xlabel="epoch", ylabel="mean train loss", title="training loss per trial")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        finite = [line.get_ydata() for line in ax_loss.get_lines()]
        if all(min(y) > 0 for y in finite if len(y)):
            ax_loss.set_yscale("log")
        ax_loss.legend(fontsize="small", ncol=1 if drawn <= 10 else 2)
    else:
        ax_loss.text(
            0.5, 0.5, "no train/epoch_loss logged", ha="center", va="center", transform=ax_loss.transAxes
        )
    if len(rows) > MAX_CURVES:
        ax_loss.set_title(f"training loss, best {MAX_CURVES} of {len(rows)} trials")

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
                render_table(rows, selection, metric, Console(file=handle, width=200, color_system=None))
        else:
            console = Console(file=out, width=None if out.isatty() else 200)
            render_table(rows, selection, metric, console)
    else:
        text = render_markdown(rows, selection, metric) if fmt == "markdown" else render_csv(rows)
        if output is not None:
            output.write_text(text)
        else:
            out.write(text)
            out.flush()
        print(f"{len(rows)} runs: experiment {selection.experiment_name}, {selection.description}", file=err)
    if output is not None:
        print(f"tables written to {output}", file=err)
    if chart is not None and rows:
        print(f"chart written to {write_chart(client, rows, chart, selection, metric)}", file=err)
    return rows
