"""The GPU check's Python half (bench/gpu_check.sh runs it): the wheel list, the import check, the CUDA sweep.

python -m bench.gpu_check wheels DIR      # here, online: download the wheels the GPU machine lacks into DIR
python -m bench.gpu_check imports         # there, after the install: every module the check needs imports
python -m bench.gpu_check sweep OUT [--dry-run]   # a 2-trial sweep end to end, one trial forced to diverge

The GPU machine (`/work/.library/device/KINDS.md`) has Python 3.12 with torch, torchvision, numpy, pandas,
matplotlib, rich, pyyaml, ... but none of hydra, optuna, mlflow, pycocotools, faster-coco-eval, and nothing
can be downloaded there: their wheels travel with the working tree (64 MiB in all), so the list below is the
package closure of masksweep minus what that image has, minus the MLflow server's own packages (the check
uses the embedded SQLite store only: no UI, no server), each pinned to the version of this environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import BENCH_CONF, log, now

# masksweep's closure minus the GPU image's packages (found by walking this environment's requirements and
# subtracting the image's package list) minus the MLflow server's packages; pure Python or small.
WHEELS = (
    "alembic",
    "annotated-types",
    "antlr4-python3-runtime",  # sdist only on PyPI: built into a wheel here (pure Python)
    "cachetools",
    "colorlog",
    "databricks-sdk",
    "faster-coco-eval",
    "gitdb",
    "gitpython",
    "google-auth",
    "hydra-core",
    "importlib-metadata",
    "mako",
    "mlflow-skinny",  # the client and the stores; `mlflow` itself adds the UI and server (~25 MB)
    "mlflow-tracing",
    "omegaconf",
    "opentelemetry-api",
    "opentelemetry-proto",
    "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    "optuna",
    "pyasn1",
    "pyasn1-modules",
    "pycocotools",
    "pydantic",
    "pydantic-core",
    "python-dotenv",
    "sqlalchemy",
    "sqlparse",
    "smmap",
    "typing-inspection",
)
# What a run imports; checked right after the install, so a missing wheel is one line, not a traceback later.
IMPORTS = (
    "torch",
    "torchvision",
    "hydra",
    "omegaconf",
    "optuna",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "alembic",
    "faster_coco_eval",
    "pycocotools.mask",
    "masksweep.train",
    "masksweep.compare",
    "hydra_plugins.masksweep_optuna.sweeper",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def fetch_wheels(directory: Path) -> int:
    """Download (pip, from the package index) the pinned wheels for CPython 3.12 on x86-64 Linux."""
    directory.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    binary = [p for p in pins if not p.startswith("antlr4")]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(directory), *binary],
    )  # fmt: skip
    if done.returncode != 0:
        return done.returncode
    antlr = next(p for p in pins if p.startswith("antlr4"))
    done = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(directory), antlr])
    size = sum(f.stat().st_size for f in directory.glob("*.whl"))
    log(f"{len(list(directory.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {directory}")
    return done.returncode


def check_imports() -> int:
    """Import every module a run needs; one line per missing one."""
    import importlib

    missing = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure here is a broken install: say which module and why
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    for line in missing:
        print(f"gpu_check: import failed: {line}", file=sys.stderr)
    if not missing:
        import torch

        log(f"imports ok; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    return 1 if missing else 0


def sweep(out: Path, dry_run: bool) -> int:
    """`masksweep-train -m sweep=seed_table` over trial1 and the forced-divergent trial, cuda (dry run: cpu):
    one trial must end COMPLETE with a value, the other PRUNED with diverged=true. Writes gpu_sweep.json."""
    from bench.fig3_sweep import launch

    device = "cpu" if dry_run else "cuda"
    root = out / "gpu-sweep"
    study = f"gpu-check-{uuid.uuid4().hex[:8]}"
    size, train, val, epochs = (64, 8, 2, 2) if dry_run else (320, 16, 8, 2)
    command = [
        sys.executable, "-m", "bench.sweep_entry", "-m", "sweep=seed_table",
        f"hydra.sweep.dir={root / 'multirun'}", f"hydra.searchpath=[file://{BENCH_CONF}]",
        f"hydra.sweeper.study_name={study}", "hydra.sweeper.n_trials=2", "experiment=trial1,diverge",
        "model=tiny" if dry_run else "model=maskrcnn_resnet50_fpn",
        f"model.min_size={size}", f"model.max_size={size}", "++model.pretrain.enabled=false",
        f"data.image_size={size}", f"data.num_train={train}", f"data.num_val={val}",
        f"data.cache_dir={root / 'synthetic'}", f"epochs={epochs}", "trainer.log_every_n_steps=1",
        "trainer.progress=false", f"device={device}",
    ]  # fmt: skip
    try:
        result = launch(root, "gpu", command, study)
    except RuntimeError as exc:
        print(f"gpu_check: the sweep failed: {exc}", file=sys.stderr)
        return 1
    trials = {t["experiment"]: t for t in result["trials"]}
    checks = {
        "two trials": len(result["trials"]) == 2,
        "trial1 COMPLETE with a value": trials.get("trial1", {}).get("state") == "COMPLETE"
        and trials["trial1"]["value"] is not None,
        "diverge PRUNED with diverged=true": trials.get("diverge", {}).get("state") == "PRUNED"
        and trials["diverge"]["diverged"],
    }
    record: dict[str, Any] = {
        "created": now(),
        "device": device,
        "dry_run": dry_run,
        "wall_s": round(result["wall_s"], 1),
        "checks": checks,
        "trials": [{k: v for k, v in t.items() if k not in ("start", "end")} for t in result["trials"]],
    }
    try:
        import torch

        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # the record is still useful without the device name
        pass
    (out / "gpu_sweep.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    for name, ok in checks.items():
        log(f"sweep check: {name}: {'ok' if ok else 'FAILED'}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("wheels").add_argument("directory", type=Path)
    commands.add_parser("imports")
    run = commands.add_parser("sweep")
    run.add_argument("out", type=Path)
    run.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        return fetch_wheels(args.directory)
    if args.command == "imports":
        return check_imports()
    args.out.mkdir(parents=True, exist_ok=True)
    return sweep(args.out.absolute(), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
