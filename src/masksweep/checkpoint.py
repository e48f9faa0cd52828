"""Trial checkpoints: written atomically after each epoch, loadable with weights_only=True, pruned by policy.

Everything non-tensor is stored as plain Python types (str, int, float, lists, dicts) or tensors, which is
what `torch.load(weights_only=True)` accepts: NumPy RNG state goes in as a tensor, the config as YAML text.
"""

from __future__ import annotations

import logging
import os
import random
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masksweep.errors import ConfigError

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
# What only an unfinished trial needs (to resume); a finished trial's checkpoints and best.pt leave it out,
# which halves them for SGD and thirds them for Adam.
RESUME_ONLY = ("optimizer", "scheduler", "warmup", "scaler", "rng", "divergence")
POLICIES = ("last", "best", "both")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a kill mid-write leaves the
    previous checkpoint intact (rename is atomic on POSIX filesystems)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path, key: str = "resume") -> dict[str, Any]:
    """A checkpoint, loaded with weights_only=True. `key` is the option the user named the file with
    (`resume` for masksweep-train, `--checkpoint` for `masksweep predict`/`evaluate`)."""
    allowed = "a last.pt or best.pt written by masksweep-train"
    if not path.is_file():
        raise ConfigError(key, str(path), f"an existing checkpoint file ({allowed})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it, never unpickle arbitrary objects
        raise ConfigError(key, str(path), f"{allowed}; this file {_why_unloadable(exc)}") from exc


def _why_unloadable(exc: Exception) -> str:
    """What is wrong with the file, in one clause. PyTorch's own message advises retrying with
    weights_only=False (unsafe, and useless for a damaged file) and filing an issue: neither applies."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"holds Python objects{what} that a safe (weights_only) load refuses to run"
    return "is truncated, damaged or not a torch checkpoint"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "has_gauss": 0,
            "gauss": 0.0,
            "state": {"key": state["numpy"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])


def check_compatible(checkpoint: dict[str, Any], model_cfg: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only the model it was made for; name the first mismatching key."""
    saved = checkpoint["model_config"]
    for key in sorted(set(saved) | set(model_cfg)):
        if key != "pretrain" and saved.get(key) != model_cfg.get(key):
            raise ConfigError(
                f"model.{key}", model_cfg.get(key), f"{saved.get(key)!r}, the value {path} was trained with"
            )


class CheckpointManager:
    """Keeps last.pt (for resuming) and best.pt (weights of the best epoch) in a trial's directory.

    Files are written on one background thread, as Lightning's AsyncCheckpointIO does: serialising and
    fsyncing a few hundred MB per epoch then overlaps the next evaluation and epoch instead of adding to the
    trial's wall time. `save` snapshots the tensors first (training goes on changing the live ones) and waits
    for the previous write, so at most one snapshot is held and files land in epoch order. `finish` and the
    context exit wait for the last write and re-raise its error: a trial never reports success with a
    checkpoint missing, and a failing trial still leaves its last good checkpoint for a retry.
    """

    def __init__(self, directory: Path, keep: str = "both") -> None:
        if keep not in POLICIES:
            raise ConfigError("checkpoint.keep", keep, ", ".join(POLICIES))
        self.directory, self.keep = directory, keep
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @property
    def best(self) -> Path:
        return self.directory / BEST

    def save(self, state: dict[str, Any], improved: bool, final: bool = False) -> None:
        """Queue this epoch's checkpoint. `final`: the trial's last epoch, after which nothing resumes, so
        only weights are written (a finished trial must not keep optimizer state: a long sweep would fill
        the disk) and, with keep=best, no last.pt at all."""
        self.wait()
        self._pending = self._writer.submit(self._write, _cpu_copy(state), improved, final)

    def _write(self, state: dict[str, Any], improved: bool, final: bool) -> None:
        weights = {k: v for k, v in state.items() if k not in RESUME_ONLY}
        if improved and self.keep in ("best", "both"):
            save_atomic(weights, self.best)
        if not final:
            save_atomic(state, self.last)  # whatever the policy: a killed trial resumes from it
        elif self.keep in ("last", "both"):
            save_atomic(weights, self.last)

    def wait(self) -> None:
        """Block until the queued write is on disk; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Wait for the final write, then drop what the policy does not keep."""
        self.wait()
        if self.keep == "best":
            self.last.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise
            log.exception("checkpoint write failed while the trial was already failing")
        finally:
            self._writer.shutdown()


def _cpu_copy(value: Any) -> Any:
    """A copy of `value` with every tensor copied to host memory, containers rebuilt, the rest shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value
