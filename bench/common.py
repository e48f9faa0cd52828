"""Shared helpers: sizes, config composition, timing statistics, machine and version description."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_CONF = Path(__file__).resolve().parent / "conf"  # extra Hydra search path (the forced-divergent trial)


def log(message: str) -> None:
    """Progress on stderr (stdout stays free for the summary)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Every knob that makes `make bench` (full) differ from `make bench-smoke` (smoke)."""

    name: str
    # figure 1: training loop
    train_image_size: int
    train_steps: int  # timed steps per variant and repeat
    train_repeats: int
    # figure 2: evaluation
    ap_images: int  # images whose (synthetic) predictions are scored by the AP comparison
    ap_repeats: int
    eval_image_size: int
    eval_images: int  # images run through the model for the whole-evaluate comparison
    eval_repeats: int
    # figure 3/4: sweeps
    sweep_image_size: int
    sweep_num_train: int
    sweep_num_val: int
    sweep_epochs: int | None  # None = the experiments' own epochs (5, trial6 10)
    sweep_experiments: tuple[str, ...]  # conf/experiment/trialN + bench/conf/experiment/diverge
    sweep_pretrain_steps: int  # 0 = no pretraining
    sweep_metric: str  # optimized_metric of the sweeps
    startup_repeats: int
    # figure 3b: a TPE search (sweeps/tpe.yaml), with vs without pruning and divergence detection
    search_seeds: tuple[int, ...]  # sampler seeds, the same on both sides
    search_trials: int  # trials per sweep
    search_image_size: int
    search_num_train: int
    search_num_val: int
    search_epochs: str | None  # None = the space's own epochs; else a search-space expression
    # figure 5: scaling
    compare_runs: int
    compare_repeats: int
    tpe_trials: int
    tpe_window: int  # trials averaged around "trial 10" and the last trial
    scaling_images: tuple[int, ...]  # evaluator-only scaling (synthetic predictions)
    scaling_model_images: tuple[int, ...]  # whole evaluate (model inference) scaling
    scaling_repeats: int
    # performance-work micro-measurements
    perf_repeats: int
    # figure 6: GPU
    gpu_image_size: int
    gpu_steps: int
    gpu_batch_size: int


FULL = Sizes(
    name="full",
    train_image_size=128,
    train_steps=6,
    train_repeats=5,
    ap_images=100,
    ap_repeats=5,
    eval_image_size=128,
    eval_images=16,
    eval_repeats=3,
    sweep_image_size=128,
    sweep_num_train=8,
    sweep_num_val=6,
    sweep_epochs=None,
    sweep_experiments=("trial1", "trial2", "trial3", "trial4", "trial5", "trial6", "diverge"),
    sweep_pretrain_steps=200,
    sweep_metric="val/ap_bbox",
    startup_repeats=5,
    search_seeds=(0, 1, 2),
    search_trials=16,
    search_image_size=64,
    search_num_train=8,
    search_num_val=6,
    search_epochs=None,
    compare_runs=500,
    compare_repeats=3,
    tpe_trials=205,
    tpe_window=5,
    scaling_images=(25, 50, 100, 200, 400),
    scaling_model_images=(4, 8, 16, 32),
    scaling_repeats=3,
    perf_repeats=5,
    gpu_image_size=800,
    gpu_steps=20,
    gpu_batch_size=4,
)

SMOKE = Sizes(
    name="smoke",
    train_image_size=64,
    train_steps=2,
    train_repeats=1,
    ap_images=8,
    ap_repeats=2,
    eval_image_size=64,
    eval_images=2,
    eval_repeats=1,
    sweep_image_size=64,
    sweep_num_train=8,
    sweep_num_val=2,
    sweep_epochs=1,
    sweep_experiments=("trial1", "trial3", "diverge"),
    sweep_pretrain_steps=0,
    sweep_metric="val/ap_bbox",
    startup_repeats=1,
    search_seeds=(0,),
    search_trials=2,
    search_image_size=64,
    search_num_train=4,
    search_num_val=2,
    search_epochs="range(1, 3)",
    compare_runs=20,
    compare_repeats=1,
    tpe_trials=14,
    tpe_window=2,
    scaling_images=(4, 8),
    scaling_model_images=(1, 2),
    scaling_repeats=1,
    perf_repeats=1,
    gpu_image_size=128,
    gpu_steps=2,
    gpu_batch_size=2,
)


@dataclass
class Context:
    sizes: Sizes
    device: str  # "cpu" or "cuda"
    workdir: Path  # scratch directory of this run (deleted at the end unless --keep)
    cache_dir: Path  # synthetic data and pretrained weights, kept between runs
    seed: int = 0

    @property
    def smoke(self) -> bool:
        return self.sizes.name == "smoke"

    def compose(self, *overrides: str):
        """The training config composed from masksweep.configs.CONFIG_DIR, pretraining off by default."""
        from hydra import compose, initialize_config_dir

        from masksweep.configs import CONFIG_DIR

        base = [
            "++model.pretrain.enabled=false",
            f"data.cache_dir={self.cache_dir / 'synthetic'}",
            f"device={self.device}",
            "trainer.progress=false",
        ]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=[*base, *overrides, *model_size_for(overrides)])

    def torch_device(self):
        import torch

        return torch.device(self.device)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- timing
def summary(values: Sequence[float], unit: str = "", digits: int = 4) -> dict[str, Any]:
    """median / min / max over repeats (the values themselves are kept for the JSON)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "unit": unit, "values": []}
    return {
        "median": round(statistics.median(values), digits + 4),
        "min": round(min(values), digits + 4),
        "max": round(max(values), digits + 4),
        "n": len(values),
        "unit": unit,
        "values": [round(v, digits + 4) for v in values],
    }


def single(value: float | int | str | None, unit: str = "") -> dict[str, Any]:
    """A value measured once (deterministic counts, or one expensive run)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"median": value, "min": value, "max": value, "n": 1, "unit": unit, "values": [value]}
    return {"value": value, "n": 1, "unit": unit}


@contextlib.contextmanager
def timer(sink: list[float], sync: Callable[[], None] | None = None) -> Iterator[None]:
    if sync:
        sync()
    tic = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            sync()
        sink.append(time.perf_counter() - tic)


def interleaved(variants: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, variant) with the variant order rotated every repeat: A B C, B C A, C A B, ...

    The machine is shared and noisy; rotating keeps slow spells from always hitting the same variant."""
    n = len(variants)
    for r in range(repeats):
        for i in range(n):
            yield r, variants[(r + i) % n]


# ------------------------------------------------------------------------------------------------- results
@dataclass
class Target:
    name: str
    target: str
    value: Any
    met: bool | None  # None = not measured

    def as_dict(self) -> dict[str, Any]:
        status = "not measured" if self.met is None else ("met" if self.met else "missed")
        return {"name": self.name, "target": self.target, "value": self.value, "status": status}


@dataclass
class Figure:
    id: str
    title: str
    setup: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if not self.targets:
            return "reported"
        states = [t.met for t in self.targets]
        if all(s is None for s in states):
            return "not measured"
        if any(s is False for s in states):
            return "missed"
        return "met"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "setup": self.setup,
            "status": self.status,
            "targets": [t.as_dict() for t in self.targets],
            "metrics": self.metrics,
            "notes": self.notes,
            "details": self.details,
            "seconds": round(self.seconds, 2),
            "error": self.error,
        }


# ------------------------------------------------------------------------------------------------- machine
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cpu = cpu or platform.processor() or platform.machine()
    mem_gib = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "hostname_hash": hex(abs(hash(platform.node())) % 16**6),
        "load_average_start": _loadavg(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
        else:
            info["gpu"] = None
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


PACKAGES = (
    "torch",
    "torchvision",
    "optuna",
    "mlflow",
    "faster-coco-eval",
    "pycocotools",
    "hydra-core",
    "numpy",
    "scipy",
)


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["masksweep_commit"] = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    found["masksweep_dirty"] = bool(status) if status is not None else None
    return found


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_average() -> list[float] | None:
    return _loadavg()


def bench_env() -> dict[str, str]:
    """Environment for subprocesses: the repo on PYTHONPATH (for `bench`), no tqdm bars, no MLflow noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HYDRA_FULL_ERROR", "1")
    env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    return env


def script(name: str) -> str:
    """A console script of this interpreter's environment (masksweep-train, masksweep)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def model_size_for(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The model's input size set to the synthetic images' own size, so a figure at N px computes at N px (the
    tiny preset's min_size/max_size are fixed at 128; a 64 px image would otherwise be upscaled)."""
    sizes = [o.split("=", 1)[1] for o in overrides if o.startswith("data.image_size=")]
    if not sizes or any(o.startswith(("model.min_size=", "model.max_size=")) for o in overrides):
        return []
    return [f"model.min_size={sizes[-1]}", f"model.max_size={sizes[-1]}"]

