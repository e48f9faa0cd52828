"""`masksweep`: check, compare, reproduce, ui, predict, evaluate. (`masksweep-train` trains.)

Heavy modules (mlflow, torch) load inside the commands, so `masksweep --help` answers at once.
User mistakes end as one line on stderr and exit status 1 (2 for bad command-line syntax).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from masksweep.errors import MasksweepError

PROG = "masksweep"
DEFAULT_CHART = Path("outputs/compare.png")


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="an MLflow server or database (default: the embedded store ./mlruns/mlflow.db)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compare, reproduce and browse masksweep trials recorded in MLflow.",
        epilog="Train with masksweep-train (e.g. `masksweep-train experiment=trial2`, "
        "`masksweep-train -m ...`).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="check the install in seconds: a tiny trial trained, scored and recorded, then removed",
        description="Train a tiny Mask R-CNN for 2 steps at 64 px from random weights (no pretraining), "
        "score it and record it in MLflow, all in a temporary directory; print one line.",
    )
    check.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")

    compare = commands.add_parser(
        "compare",
        help="the report's tables (hyperparameters, results) for a sweep or an experiment",
        description="Print the hyperparameter and results tables from MLflow, sorted by the optimized "
        "metric, and write a PNG of the loss curves and AP per trial. Default: the latest sweep "
        "of the experiment, or all its runs when the latest run was not a sweep.",
    )
    compare.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: masksweep)")
    compare.add_argument("--sweep", metavar="PARENT_RUN_ID", help="a sweep's parent run: compare its trials")
    compare.add_argument(
        "--all",
        action="store_true",
        dest="all_runs",
        help="every trial run of the experiment, not only the latest sweep",
    )
    compare.add_argument(
        "--format",
        choices=("table", "markdown", "csv"),
        default="table",
        help="table (default), markdown or csv (one flat table, full precision)",
    )
    compare.add_argument(
        "--output", metavar="FILE", type=Path, help="write the tables to FILE instead of stdout"
    )
    compare.add_argument(
        "--chart",
        metavar="PNG",
        type=Path,
        default=DEFAULT_CHART,
        help=f"where the chart goes (default: {DEFAULT_CHART})",
    )
    compare.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    compare.add_argument(
        "--jobs", action="store_true", help="also where each trial ran: SLURM job, node, requeues, log file"
    )
    _add_store(compare)

    reproduce = commands.add_parser(
        "reproduce",
        help="re-run a logged run from its logged config and diff the two",
        description="Download RUN_ID's logged config, train it again as a new run tagged "
        "masksweep.reproduced_from=RUN_ID, and print the params and final metrics side by side.",
    )
    reproduce.add_argument("run_id", metavar="RUN_ID")
    reproduce.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config changes for the replay, e.g. device=cpu (the diff shows them)",
    )
    reproduce.add_argument("--check", action="store_true", help="exit 1 when the metrics differ")
    _add_store(reproduce)

    ui = commands.add_parser(
        "ui",
        help="start the MLflow UI on the store and print its URL",
        description="Run `mlflow server` on the store (Ctrl-C stops it).",
    )
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback only)")
    ui.add_argument("--experiment", metavar="NAME", default="masksweep", help="the experiment the URL opens")
    _add_store(ui)

    predict = commands.add_parser(
        "predict",
        help="instance-id maps, overlays and COCO predictions for image files",
        description="For each image: NAME_instances.png (0 = background, 1..N by descending score; 16-bit "
        "beyond 255 instances) and NAME_overlay.png; plus predictions.json (COCO results) for all.",
    )
    _add_model_source(predict)
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    predict.add_argument("--out", type=Path, required=True, metavar="DIR")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--mask-threshold", type=float, default=0.5)
    predict.add_argument("--batch-size", type=int, default=4)
    predict.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    _add_store(predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="re-score a trained model on any dataset config",
        description="AP bbox/segm and the IoUs of a trained model on the val split of a data config, logged "
        "to the source run as eval/<dataset>/<metric> (or to a new run with --new-run).",
    )
    _add_model_source(evaluate)
    evaluate.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides for the data, e.g. data=coco data.val.ann_file=...",
    )
    evaluate.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="your own configs, as for masksweep-train (e.g. DIR/data/mine.yaml for data=mine)",
    )
    evaluate.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="test: the held-out split (data.test); without data overrides the run's own, logged as test/*",
    )
    evaluate.add_argument("--new-run", action="store_true", help="log to a new MLflow run")
    evaluate.add_argument("--experiment", metavar="NAME", default="masksweep")
    evaluate.add_argument("--device", default="auto")
    _add_store(evaluate)
    return parser


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_ID", help="an MLflow run: its best checkpoint (else its last)")
    source.add_argument("--checkpoint", metavar="PATH", type=Path, help="a masksweep checkpoint file")


def _predict(args: argparse.Namespace) -> int:
    from masksweep.inference import find_images, load_trained, predict_files
    from masksweep.rescore import checkpoint_of
    from masksweep.train import resolve_device

    device = resolve_device(args.device, key="--device")
    trained = load_trained(checkpoint_of(args.run, args.checkpoint, args.tracking_uri), device)
    paths = find_images(args.inputs)
    summary = predict_files(
        trained,
        paths,
        args.out,
        device,
        args.score_threshold,
        args.mask_threshold,
        args.batch_size,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {len(summary.written)} of {len(paths)} images to {args.out}")
    for path, reason in summary.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 1 if summary.skipped else 0


def _evaluate(args: argparse.Namespace) -> int:
    from masksweep.configs import with_config_dir
    from masksweep.rescore import checkpoint_of, record, rescore
    from masksweep.train import resolve_device

    overrides = with_config_dir(args.config_dir, args.overrides)
    device = resolve_device(args.device, key="--device")  # before any store or file is read
    checkpoint = checkpoint_of(args.run, args.checkpoint, args.tracking_uri)
    prefix, metrics = rescore(checkpoint, overrides, device, args.split)
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.4f}")
    if args.run or args.new_run:
        from masksweep.tracking import CLI_OPTION, open_client, resolve_run_id

        client, _ = open_client(args.tracking_uri, option=CLI_OPTION)
        if args.run:
            args.run = resolve_run_id(client, args.run, f"--run {args.run!r}")
        run_id = record(client, args.run, args.new_run, args.experiment, prefix, metrics, checkpoint)
        print(f"logged as {prefix}/... to run {run_id}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "check":
        from masksweep.check import check

        return check(args.device)
    if args.command == "predict":
        return _predict(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "ui":
        from masksweep.ui import serve

        return serve(args.tracking_uri, args.host, args.port, args.experiment)

    from masksweep.tracking import CLI_OPTION, open_client

    client, _ = open_client(args.tracking_uri, create=False, option=CLI_OPTION)
    if args.command == "compare":
        from masksweep.compare import compare

        compare(
            client,
            args.experiment,
            args.sweep,
            args.format,
            args.output,
            None if args.no_chart else args.chart,
            args.all_runs,
            args.jobs,
        )
        return 0
    from masksweep.reproduce import reproduce

    return reproduce(client, args.run_id, args.tracking_uri, args.overrides, args.check)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MasksweepError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an MLflow error the commands did not anticipate: still one line
        from masksweep.tracking import first_line

        if type(exc).__module__.startswith("mlflow"):
            print(f"{PROG} {args.command}: error: {first_line(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
