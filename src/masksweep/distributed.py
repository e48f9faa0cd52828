"""One trial on several processes with DistributedDataParallel, as torchvision's detection reference runs.

A trial is one process unless a launcher started several copies of it:
- torchrun (`torchrun --nproc_per_node=N masksweep-train ...`) exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*;
- a SLURM job of several tasks started by submitit (`hydra.launcher.tasks_per_node=N`): every task runs the
  Hydra job, and submitit's TorchDistributedEnvironment turns its job environment into the same variables.
Outside both nothing here does anything: no process group, and every helper is the identity.

The processes agree on every stop without extra waits, at points all of them reach:
- divergence: the detector is fed the loss averaged over the ranks and the gradient norm of the averaged
  gradients, so every rank latches the same step and raises at the same host sync;
- everything decided on rank 0 (pruning) or that may fail on one rank between collectives goes through
  `stop_together`, which raises the first rank's stop on every rank;
- a rank failing alone (a data error mid-epoch) leaves the others in a collective until its exit breaks it
  or the launcher stops them (torchrun's SIGTERM); `peer_failures` then makes them stop with its error. The
  process group's timeout is the last resort: no rank waits for ever.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from masksweep.errors import ConfigError, MasksweepError

if TYPE_CHECKING:
    from masksweep.metrics import COCOEvaluator

log = logging.getLogger(__name__)

T = TypeVar("T")
_AGREED = "_masksweep_agreed"  # set on an exception that every rank raised together
_FAILED_KEY = "masksweep/failed"  # the process group store's key for the first failing rank's line


@dataclass(frozen=True)
class World:
    """This process's place among the trial's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that records the run, reports to Optuna and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process group's view (one process when none is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched_world() -> World:
    """What the launcher asked for: torchrun's variables, else a multi-task submitit job's environment
    (exported as torchrun's, for init_process_group's env:// rendezvous), else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SUBMITIT_EXECUTOR" in env:  # a submitit job (slurm or local), possibly of several tasks
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        job = JobEnvironment()
        if job.num_tasks == 1:
            return World()
        if "MASTER_PORT" not in env:
            # submitit's port depends on the job id alone: ids repeat across clusters, and a requeued job
            # keeps its id while its last attempt's port may still be held. All tasks share these three.
            key = f"{env.get('SUBMITIT_FOLDER')}:{job.job_id}:{env.get('SLURM_RESTART_COUNT', '0')}"
            env["MASTER_PORT"] = str(20000 + int(hashlib.sha256(key.encode()).hexdigest(), 16) % 40000)
        # CUDA_VISIBLE_DEVICES stays as SLURM set it: the device is cuda:LOCAL_RANK, as under torchrun.
        # overwrite: MASTER_PORT is set (above, or by the user, whose value it keeps).
        found = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if job.num_nodes == 1:  # the rendezvous stays on the node, whether or not its SLURM name resolves
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        return World(found.rank, found.world_size, found.local_rank)
    return World()


def trial_device(device: torch.device, launched: World) -> torch.device:
    """Each process of a GPU trial uses the GPU of its local rank (torchvision reference's rule)."""
    if launched.distributed and device.type == "cuda":
        return torch.device("cuda", launched.local_rank)
    return device


@contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[World]:
    """The trial's process group for as long as the block runs: NCCL on GPUs, gloo on the CPU. `timeout_s`
    bounds every collective, so a rank whose peer died without a word fails instead of hanging."""
    launched = launched_world()
    if not launched.distributed:
        yield launched
        return
    if not timeout_s > 0:
        raise ConfigError("trainer.ddp_timeout_s", timeout_s, "a number of seconds > 0")
    if device.type == "cuda":
        torch.cuda.set_device(trial_device(device, launched))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("Process %d of %d (%s)", launched.rank, launched.size, backend)
    # Rank 0 tells the story; the others only warn (torchvision's setup_for_distributed), so the epoch lines
    # are not printed N times, once with each rank's own shard of the val images.
    package_log = logging.getLogger("masksweep")
    level = package_log.level
    if not launched.main:
        package_log.setLevel(logging.WARNING)
    try:
        yield world()
    except BaseException as exc:
        if _agreed(exc):
            # Every rank stops here. A launcher ends the other workers as soon as one exits non-zero
            # (torchrun's SIGTERM): none leaves before rank 0 has recorded how the run ended.
            try:
                dist.barrier()
            except Exception as barrier_exc:  # the stop matters more than the wait
                log.warning("ranks did not meet after the stop: %s", barrier_exc)
        raise
    finally:
        package_log.setLevel(level)
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to train: DistributedDataParallel around `model` in a process group, else `model`.
    Checkpoints and evaluation keep using `model` itself (no `module.` prefix, no gradient hooks)."""
    if not world().distributed:
        return model
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them at the start of
    each training forward, so after the last step every rank holds the statistics of its own last batch:
    without this, each rank would evaluate its shard with another model than the one rank 0 checkpoints."""
    if not world().distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def sampler(dataset: Dataset, train: bool, seed: int) -> DistributedSampler | Sequence[int] | None:
    """This rank's share of `dataset` (None for one process).

    Training: DistributedSampler, shuffled by seed and epoch (`set_epoch`), as in torchvision's reference.
    Evaluation: rank r takes images r, r+W, r+2W, ...: every image exactly once. DistributedSampler would pad
    the shards to equal length by repeating images, and COCO would count the repeats."""
    current = world()
    if not current.distributed:
        return None
    if train:
        return DistributedSampler(dataset, current.size, current.rank, shuffle=True, seed=seed)
    return range(current.rank, len(dataset), current.size)  # type: ignore[arg-type]


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """A new shuffle per epoch for a DistributedSampler (deterministic in seed and epoch: a resumed trial
    sees the order it would have seen)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks (`values` itself for one process). An all_reduce on the tensor's
    device: no host sync."""
    current = world()
    if not current.distributed:
        return values
    total = values.clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / current.size


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    current = world()
    if not current.distributed:
        return [value]
    gathered: list[T] | None = [None] * current.size if current.main else None  # type: ignore[list-item]
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not world().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate(evaluator: COCOEvaluator) -> dict[str, float]:
    """The metrics over every rank's shard: rank 0 merges what each rank's evaluator accumulated (RLE
    detections and IoU sums, not raw masks) and scores it once; every rank gets the numbers. Rank 0's merged
    evaluator then holds every image, for the predictions export."""
    if not world().distributed:
        return evaluator.evaluate()
    states = gather_to_main(evaluator.state())
    metrics = None
    with stop_together():  # a scoring error on rank 0 must not leave the others waiting for the numbers
        if states is not None:
            for state in states[1:]:
                evaluator.merge(state)
            metrics = evaluator.evaluate()
    return broadcast_from_main(metrics)  # type: ignore[arg-type]


class StoppedElsewhere(MasksweepError):
    """Another rank of the trial failed; this one stops with it (its own error is on that rank)."""


def _portable(exc: BaseException, rank: int) -> BaseException:
    """`exc` as it can travel to the other ranks: stops and interrupts pickle themselves (their types drive
    how a run ends); any other error becomes one line naming the rank."""
    from masksweep.errors import TrialStopped
    from masksweep.interrupts import Interrupted

    if isinstance(exc, (TrialStopped, Interrupted)):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(2)
    return StoppedElsewhere(f"rank {rank} failed: {type(exc).__name__}: {exc}")


@contextmanager
def peer_failures() -> Iterator[None]:
    """Stop with the cause, not the symptom, when a rank fails between two agreements (a data error
    mid-epoch). The others are then waiting in the next collective until the failed rank's exit breaks it or
    the launcher stops them (torchrun's SIGTERM), and would record that: KILLED, or a connection error. The
    first rank to fail leaves its one line in the process group's store; a rank stopped after it raises that
    line instead, so rank 0's run ends FAILED with the cause, as in one process."""
    if not world().distributed:
        yield
        return
    try:
        yield
    except BaseException as exc:
        if _agreed(exc):
            raise
        mine = None if isinstance(exc, KeyboardInterrupt) else str(_portable(exc, world().rank))
        first = _first_failure(mine)
        if first is not None and first != mine:
            raise StoppedElsewhere(first) from exc
        raise


def _first_failure(mine: str | None) -> str | None:
    """The first failing rank's line: `mine` if no rank failed before (a signal claims nothing)."""
    # The default store: the one init_process_group built (torchrun's agent, or rank 0's TCPStore).
    store = dist.distributed_c10d._get_default_store()
    try:
        if mine is None:
            return store.get(_FAILED_KEY).decode() if store.check([_FAILED_KEY]) else None
        return store.compare_set(_FAILED_KEY, "", mine).decode()
    except Exception as exc:  # the store's host is gone too: nothing more to learn
        log.warning("could not read the failing rank from the process group's store: %s", exc)
        return None


def _agreed(exc: BaseException) -> bool:
    """Whether every rank raised `exc` at the same point: through `stop_together`, or a divergence (the
    detector sees the same rank-averaged values on every rank), also as divergence.action=fail's error."""
    from masksweep.errors import TrialDiverged

    return getattr(exc, _AGREED, False) or any(isinstance(e, TrialDiverged) for e in (exc, exc.__cause__))


@contextmanager
def stop_together() -> Iterator[None]:
    """Run the block on every rank, then agree: if it raised on any rank, every rank raises (its own error
    where it had one, else the lowest failing rank's). For a block that every rank enters and that holds no
    collective: rank 0's Optuna report (the pruner's decision), a check that may fail on one rank."""
    if not world().distributed:
        yield
        return
    mine: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # re-raised below, once the other ranks know
        mine = exc
    stops: list[BaseException | None] = [None] * world().size
    dist.all_gather_object(stops, None if mine is None else _portable(mine, world().rank))
    first = mine if mine is not None else next((stop for stop in stops if stop is not None), None)
    if first is not None:
        setattr(first, _AGREED, True)
        raise first
