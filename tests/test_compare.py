"""`masksweep compare`: the report's tables from MLflow, in each format, and its run selection and errors."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric

from masksweep import cli
from masksweep.compare import compare, format_number
from masksweep.tracking import MLflowTracker, experiment_id, open_client

SGD, ADAM = "torch.optim.SGD", "torch.optim.Adam"
STEPLR, COSINE = "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.CosineAnnealingLR"

# label -> what the trial logs. Expected order (val/ap_segm, best first): trial2, trial1, #3, #4.
TRIALS = {
    "trial1": dict(
        tags={"masksweep.trial_name": "trial1"},
        optimizer=SGD,
        scheduler=STEPLR,
        lr=0.005,
        momentum=0.9,
        weight_decay=0.0005,
        epochs=3,
        status="FINISHED",
        metrics={
            "val/ap_bbox": 0.6123456789,
            "val/ap_segm": 0.5555555555,
            "val/iou_global": 0.7012345,
            "final/loss_last_epoch": 0.4321987,
            "final/loss_classifier_last_epoch": 0.1234567,
        },
        losses=[1.9, 0.8, 0.4321987],
    ),
    "trial2": dict(
        tags={"masksweep.trial_name": "trial2"},
        optimizer=ADAM,
        scheduler=None,
        lr=0.0001,
        momentum=None,
        weight_decay=0.0,
        epochs=3,
        status="FINISHED",
        metrics={
            "val/ap_bbox": 0.6543210987,
            "val/ap_segm": 0.6000000001,
            "val/iou_global": 0.7712345,
            "final/loss_last_epoch": 0.3999999,
            "final/loss_classifier_last_epoch": 0.0999999,
        },
        losses=[1.5, 0.7, 0.3999999],
    ),
    "#3": dict(
        tags={
            "optuna.trial_number": "3",
            "stop.kind": "diverged",
            "stop.reason": "loss 2.1e+21 > 1000",
            "stop.step": "7",
            "stop.value": "2.1e+21",
        },
        optimizer=SGD,
        scheduler=COSINE,
        lr=0.02,
        momentum=0.9,
        weight_decay=0.0005,
        epochs=3,
        status="KILLED",
        metrics={
            "val/ap_bbox": 0.0123,
            "val/ap_segm": 0.0100001,
            "val/iou_global": 0.05,
            "final/loss_last_epoch": 2.1e21,
            "final/loss_classifier_last_epoch": 3.3e20,
        },
        losses=[2.1e21],
    ),
    "#4": dict(
        tags={"optuna.trial_number": "4", "error": "RuntimeError: CUDA out of memory"},
        optimizer=SGD,
        scheduler=STEPLR,
        lr=0.01,
        momentum=0.95,
        weight_decay=0.001,
        epochs=3,
        status="FAILED",
        metrics={},
        losses=[],
    ),
}
ORDER = ["trial2", "trial1", "#3", "#4"]
RESULT_KEYS = {
    "AP bbox": "val/ap_bbox",
    "AP segm": "val/ap_segm",
    "Loss (last epoch)": "final/loss_last_epoch",
    "Loss classifier (last epoch)": "final/loss_classifier_last_epoch",
    "Global IoU": "val/iou_global",
}


def log_trial(client, exp: str, name: str, spec: dict, parent: str | None = None) -> str:
    """Record a trial the way train() does: MLflowTracker params, per-epoch metrics, final status + tags."""
    tags = {k: v for k, v in spec["tags"].items() if not k.startswith(("stop.", "error"))}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    tracker = MLflowTracker(client, run_id)
    tracker.log_params(
        {
            "optimizer._target_": spec["optimizer"],
            "optimizer.lr": spec["lr"],
            "scheduler.lr_scheduler": "None" if spec["scheduler"] is None else "{...}",
            **({"scheduler.lr_scheduler._target_": spec["scheduler"]} if spec["scheduler"] else {}),
            "lr": spec["lr"],
            "momentum": spec["momentum"],
            "weight_decay": spec["weight_decay"],
            "epochs": spec["epochs"],
            "optimized_metric": "val/ap_segm",
            "seed": 42,
        }
    )
    for epoch, loss in enumerate(spec["losses"], 1):
        tracker.log_metrics({"train/loss": loss}, step=10 * epoch)
        tracker.log_metrics({"train/epoch_loss": loss, "val/ap_segm": 0.0}, step=epoch)
    tracker.log_metrics(spec["metrics"], step=len(spec["losses"]) + 1)
    end_tags = {k: v for k, v in spec["tags"].items() if k.startswith(("stop.", "error"))}
    tracker.finish(spec["status"], end_tags)
    time.sleep(0.005)  # distinct start times
    return run_id


@pytest.fixture
def store(workdir: Path) -> dict:
    """An older standalone run, then a sweep (parent run) with the four TRIALS nested under it."""
    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    old = log_trial(client, exp, "old", {**TRIALS["trial1"], "tags": {"masksweep.trial_name": "baseline"}})
    parent = client.create_run(exp, run_name="sweep-test", tags={"masksweep.role": "sweep"}).info.run_id
    ids = {label: log_trial(client, exp, label, spec, parent) for label, spec in TRIALS.items()}
    client.set_terminated(parent, "FINISHED")
    return {"client": client, "exp": exp, "parent": parent, "ids": ids, "old": old}


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_csv(text: str) -> dict[str, dict[str, str]]:
    return {row["Trial"]: row for row in csv.DictReader(io.StringIO(text))}


def parse_grid(text: str, bar: str, is_header) -> dict[str, dict[str, str]]:
    """Rows of the two tables (rich or markdown), merged per trial label."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if is_header(line, lines[i + 1] if i + 1 < len(lines) else ""):
            header = [c.strip() for c in line.strip().strip("┃|").split("┃" if "┃" in line else "|")]
        elif header and line.startswith(bar):
            cells = [c.strip() for c in line.strip().strip(bar).split(bar)]
            if len(cells) == len(header) and not set(line) <= set("|-"):
                rows.setdefault(cells[0], {}).update(zip(header, cells, strict=True))
    return rows


def parse_table(text: str) -> dict[str, dict[str, str]]:
    return parse_grid(text, "│", lambda line, _next: "┃" in line)


def parse_markdown(text: str) -> dict[str, dict[str, str]]:
    def is_header(line: str, following: str) -> bool:
        return line.startswith("|") and following.startswith("|---")

    return parse_grid(text, "|", is_header)


def expected_cells(label: str, exact: bool) -> dict[str, str]:
    spec = TRIALS[label]
    number = (lambda v: repr(v)) if exact else format_number
    cells = {
        "Optimizer": spec["optimizer"].rsplit(".", 1)[1],
        "Scheduler": spec["scheduler"].rsplit(".", 1)[1] if spec["scheduler"] else "none",
        "lr": str(spec["lr"]),
        "Momentum": "none" if spec["momentum"] is None else str(spec["momentum"]),
        "Weight decay": str(spec["weight_decay"]),
        "Epochs": str(spec["epochs"]),
    }
    for column, key in RESULT_KEYS.items():
        value = spec["metrics"].get(key)
        cells[column] = number(value) if value is not None else ("" if exact else "-")
    return cells


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv"])
def test_each_format_shows_the_logged_values(store: dict, capsys, workdir: Path, fmt: str) -> None:
    out_file = workdir / f"tables.{fmt}"
    code, _, err = run_cli(capsys, "compare", "--format", fmt, "--no-chart", "--output", str(out_file))
    assert code == 0, err
    text = out_file.read_text()
    rows = {"csv": parse_csv, "markdown": parse_markdown, "table": parse_table}[fmt](text)
    assert list(rows) == ORDER  # sorted by val/ap_segm, best first; the failed trial (no metric) last
    for label in ORDER:
        expected = expected_cells(label, exact=fmt == "csv")
        assert {k: rows[label][k] for k in expected} == expected, label
    assert rows["trial2"]["Run ID"] == store["ids"]["trial2"]
    if fmt == "csv":
        killed = rows["#3"]
        assert (killed["Status"], killed["Stop kind"], killed["Stop step"]) == ("KILLED", "diverged", "7")
        assert rows["#3"]["Stop reason"] == "loss 2.1e+21 > 1000"
        assert rows["#4"]["Status"] == "FAILED" and rows["#4"]["Error"] == "RuntimeError: CUDA out of memory"
        assert float(rows["trial1"]["AP segm"]) == TRIALS["trial1"]["metrics"]["val/ap_segm"]
    else:
        assert rows["#3"]["Status"] == "KILLED (diverged)" and rows["#3"]["Stop step"] == "7"
        assert rows["#3"]["Stop reason"] == "diverged: loss 2.1e+21 > 1000"
        assert rows["#4"]["Status"] == "FAILED" and "CUDA out of memory" in rows["#4"]["Stop reason"]
        assert rows["#3"]["Loss (last epoch)"] == "2.100e+21"


def test_stdout_output_and_the_chart(store: dict, capsys, workdir: Path) -> None:
    code, out, err = run_cli(capsys, "compare", "--format", "markdown", "--chart", "chart.png")
    assert code == 0, err
    assert list(parse_markdown(out)) == ORDER and "## Hyperparameters" in out and "## Results" in out
    chart = workdir / "chart.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    assert "chart written to chart.png" in err


def test_selection_latest_sweep_then_all_runs(store: dict, capsys) -> None:
    code, out, _ = run_cli(capsys, "compare", "--format", "csv", "--no-chart")
    assert code == 0 and list(parse_csv(out)) == ORDER  # the latest top-level run is the sweep
    code, out, _ = run_cli(capsys, "compare", "--format", "csv", "--no-chart", "--all")
    assert sorted(parse_csv(out)) == sorted([*ORDER, "baseline"])
    # A standalone run after the sweep (`make run`): the default shows every trial run of the experiment.
    new = {**TRIALS["trial1"], "tags": {"masksweep.trial_name": "new"}}
    log_trial(store["client"], store["exp"], "new", new)
    code, out, _ = run_cli(capsys, "compare", "--format", "csv", "--no-chart")
    assert sorted(parse_csv(out)) == sorted([*ORDER, "baseline", "new"])
    code, out, _ = run_cli(capsys, "compare", "--format", "csv", "--no-chart", "--sweep", store["parent"])
    assert list(parse_csv(out)) == ORDER
    code, out, _ = run_cli(capsys, "compare", "--format", "csv", "--no-chart", "--sweep", store["parent"][:8])
    assert list(parse_csv(out)) == ORDER  # a run id prefix, as the tables print it


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--experiment", "nope"), "experiment 'nope' not found"),
        (("--sweep", "0" * 32), f"run '{'0' * 32}' not found"),
        (("--sweep", "not-a-run-id"), "run 'not-a-run-id' not found"),
        (("--experiment", "Default"), "experiment 'Default' has no runs"),
    ],
)
def test_user_mistakes_are_one_line_errors(store: dict, capsys, args: tuple[str, ...], needle: str) -> None:
    code, out, err = run_cli(capsys, "compare", "--no-chart", *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_trial_is_not_a_sweep(store: dict, capsys) -> None:
    code, _, err = run_cli(capsys, "compare", "--sweep", store["ids"]["trial1"])
    assert code == 1 and "has no nested trial runs" in err


def test_no_store_is_a_clear_error(workdir: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "compare")
    assert code == 1 and "no MLflow store at" in err and "Traceback" not in err
    assert not (workdir / "mlruns").exists()  # compare never creates an empty store


def test_bad_format_is_rejected_by_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--format", "xml"])
    assert info.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err


class CountingClient:
    """Counts the client calls compare() makes (the table path must not read metric histories)."""

    def __init__(self, client) -> None:
        self.client, self.calls = client, {}

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return call


@pytest.mark.slow
def test_500_runs_compare_quickly(workdir: Path) -> None:
    from mlflow.entities import Metric, Param

    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    parent = client.create_run(exp, run_name="big", tags={"masksweep.role": "sweep"}).info.run_id
    for n in range(500):
        run = client.create_run(
            exp, run_name=f"trial-{n}", tags={"mlflow.parentRunId": parent, "optuna.trial_number": str(n)}
        ).info.run_id
        params = [Param(f"model.detector.key{j}", str(j)) for j in range(90)]
        params += [
            Param("optimizer._target_", SGD),
            Param("lr", str(0.0001 * (n + 1))),
            Param("epochs", "5"),
            Param("optimized_metric", "val/ap_segm"),
        ]
        metrics = [Metric(k, (n % 97) / 100, 0, e) for e in (1, 2, 3) for k in RESULT_KEYS.values()]
        metrics += [Metric("train/epoch_loss", 1.0 / e, 0, e) for e in (1, 2, 3)]
        client.log_batch(run, params=params, metrics=metrics)
    client.set_terminated(parent, "FINISHED")

    counting = CountingClient(client)
    out = io.StringIO()
    rows = compare(counting, fmt="table", out=out, err=io.StringIO())
    # Its speed is measured by the benchmark (bench/, figure 5), never asserted in a test.
    assert len(rows) == 500 and rows[0].metrics["val/ap_segm"] == 0.96
    assert "get_metric_history" not in counting.calls and counting.calls.get("search_runs", 0) <= 2

    chart = workdir / "big.png"
    compare(counting, fmt="csv", out=io.StringIO(), err=io.StringIO(), chart=chart)
    # Every trial's loss curve is drawn, from one bulk query per 200 runs (not one call per run).
    assert "get_metric_history" not in counting.calls and chart.is_file()


def test_a_study_is_shown_whole_across_parent_runs(workdir: Path, capsys) -> None:
    """A rerun's second parent, a dead worker's retried attempt, the report's names and the test split."""
    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    other = client.create_run(exp, run_name="sweep-other", tags={"masksweep.role": "sweep"}).info.run_id
    log_trial(client, exp, "x", {**TRIALS["trial1"], "tags": {"optuna.trial_number": "0"}}, other)
    study = {"optuna.study_name": "lr-study"}
    sweep_tags = {"masksweep.role": "sweep", **study}
    first = client.create_run(exp, run_name="sweep-lr-study", tags=sweep_tags).info.run_id
    named = {**study, "masksweep.trial_name": "trial4", "optuna.trial_number": "3"}
    best = log_trial(client, exp, "trial4", {**TRIALS["trial2"], "tags": named}, first)
    client.log_batch(best, metrics=[Metric("test/ap_segm", 0.5812, 0, 0)])
    dead = {**study, "optuna.trial_number": "4", "masksweep.retried_as": "5", "error": "its worker died"}
    log_trial(client, exp, "dead", {**TRIALS["#4"], "tags": dead}, first)
    second = client.create_run(exp, run_name="sweep-lr-study", tags=sweep_tags).info.run_id
    log_trial(
        client, exp, "retry", {**TRIALS["trial1"], "tags": {**study, "optuna.trial_number": "5"}}, second
    )

    for args in ((), ("--sweep", second[:8]), ("--sweep", first)):
        code, out, err = run_cli(capsys, "compare", "--format", "csv", "--no-chart", *args)
        assert code == 0, err
        rows = parse_csv(out)
        assert list(rows) == ["trial4 (#3)", "#5", "#4"], args  # the best trial came from the first parent
        assert rows["trial4 (#3)"]["AP segm (test)"] == "0.5812" and rows["#5"]["AP segm (test)"] == ""
        assert "3 runs: 2 finished, 1 failed (1 retried)" in err and "study lr-study (2 parent runs)" in err
    code, out, _ = run_cli(capsys, "compare", "--format", "markdown", "--no-chart")
    rows = parse_markdown(out)
    assert (
        rows["#4"]["Status"] == "FAILED (retried as #5)" and rows["trial4 (#3)"]["AP segm (test)"] == "0.5812"
    )
    assert list(rows["#5"]).index("AP segm (test)") == list(rows["#5"]).index("AP segm") + 1  # beside val


def test_the_chart_draws_every_trials_steps_and_marks_the_stops(store: dict, workdir: Path) -> None:
    from masksweep.compare import build_rows, loss_curves, select_runs
    from masksweep.tracking.store import metric_histories

    client = store["client"]
    _, runs = select_runs(client)
    rows = build_rows(runs)
    ids = [r.run_id for r in rows]
    histories = metric_histories(client, ids, "train/loss")  # a SQL store: one bulk query
    server_like = SimpleNamespace(get_metric_history=client.get_metric_history)  # no store: one call a run
    for fetched in (histories, metric_histories(server_like, ids, "train/loss")):
        for run_id in ids:
            expected = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
            assert [(m.step, m.value) for m in fetched[run_id]] == [(m.step, m.value) for m in expected]
    curves = loss_curves(rows, histories)
    # The diverged trial's only point is the loss that stopped it; the failed one logged none.
    assert list(curves.points) == ["trial2", "trial1", "#3"] and curves.named == ["trial2", "trial1", "#3"]
    assert curves.points["#3"] == [(10, 2.1e21)] and curves.marks == [(10, 2.1e21)]
    assert curves.points["trial1"] == [(10, 1.9), (20, 0.8), (30, 0.4321987)]
    chart = workdir / "chart.png"
    compare(client, fmt="csv", out=io.StringIO(), err=io.StringIO(), chart=chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
