"""`masksweep`: compare trials, reproduce a run, open the MLflow UI. (`masksweep-train` trains.)

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
    parser.add_argument("--tracking-uri", metavar="URI", default=None,
                        help="an MLflow server or database (default: the embedded store ./mlruns/mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compare, reproduce and browse masksweep trials recorded in MLflow.",
        epilog="Train with masksweep-train (e.g. `masksweep-train experiment=trial2`, "
               "`masksweep-train -m ...`).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compare = commands.add_parser(
        "compare", help="the report's tables (hyperparameters, results) for a sweep or an experiment",
        description="Print the hyperparameter and results tables from MLflow, sorted by the optimized "
                    "metric, and write a PNG of the loss curves and AP per trial. Default: the latest sweep "
                    "of the experiment, or all its runs when the latest run was not a sweep.")
    compare.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: masksweep)")
    compare.add_argument("--sweep", metavar="PARENT_RUN_ID", help="a sweep's parent run: compare its trials")
    compare.add_argument("--all", action="store_true", dest="all_runs",
                         help="every trial run of the experiment, not only the latest sweep")
    compare.add_argument("--format", choices=("table", "markdown", "csv"), default="table",
                         help="table (default), markdown or csv (one flat table, full precision)")
    compare.add_argument("--output", metavar="FILE", type=Path,
                         help="write the tables to FILE instead of stdout")
    compare.add_argument("--chart", metavar="PNG", type=Path, default=DEFAULT_CHART,
                         help=f"where the chart goes (default: {DEFAULT_CHART})")
    compare.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    _add_store(compare)

    reproduce = commands.add_parser(
        "reproduce", help="re-run a logged run from its logged config and diff the two",
        description="Download RUN_ID's logged config, train it again as a new run tagged "
                    "masksweep.reproduced_from=RUN_ID, and print the params and final metrics side by side.")
    reproduce.add_argument("run_id", metavar="RUN_ID")
    reproduce.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                           help="config changes for the replay, e.g. device=cpu (the diff shows them)")
    reproduce.add_argument("--check", action="store_true", help="exit 1 when the metrics differ")
    _add_store(reproduce)

    ui = commands.add_parser("ui", help="start the MLflow UI on the store and print its URL",
                             description="Run `mlflow server` on the store (Ctrl-C stops it).")
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback only)")
    ui.add_argument("--experiment", metavar="NAME", default="masksweep", help="the experiment the URL opens")
    _add_store(ui)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "ui":
        from masksweep.ui import serve

        return serve(args.tracking_uri, args.host, args.port, args.experiment)

    from masksweep.tracking import open_client

    client, _ = open_client(args.tracking_uri, create=False)
    if args.command == "compare":
        from masksweep.compare import compare

        compare(client, args.experiment, args.sweep, args.format, args.output,
                None if args.no_chart else args.chart, args.all_runs)
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
        from masksweep.tracking import _first_line

        if type(exc).__module__.startswith("mlflow"):
            print(f"{PROG} {args.command}: error: {_first_line(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
