"""SIGTERM and SIGINT as one exception, so a killed trial ends its MLflow run KILLED like Ctrl-C does.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM (`kill`, SLURM's scancel, a container stop)
end the process on the spot: no `finally` runs, and the MLflow run stays RUNNING for ever. While
`signals_raise()` is active, both raise `Interrupted`, a KeyboardInterrupt: the code that already handles
Ctrl-C (the tracker's KILLED status, the checkpoint writer's wait for its last file, a sweep's retry of the
trial) handles a kill the same way. A checkpoint on disk is never half-written either way: it is replaced
by an atomic rename (masksweep.checkpoint.save_atomic).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The process got SIGTERM or SIGINT; `exit_status` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __reduce__(self) -> tuple:
        return type(self), (self.signum,)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Inside the block, the first SIGTERM or SIGINT raises Interrupted in the main thread; one that comes
    while the trial is already stopping (marking its run, finishing a checkpoint write) is logged and
    ignored, so the stop completes. Outside the main thread (signals cannot be caught there) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            log.warning("%s again: already stopping", signal.Signals(signum).name)
            return
        stopping = True
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
