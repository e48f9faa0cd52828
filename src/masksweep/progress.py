"""Progress of a loop of known length (training steps, evaluation batches, pretraining), wherever stderr goes.

On a terminal it is a tqdm bar. Elsewhere (a log file, SLURM, CI) a bar would be a stream of carriage
returns, so a log line goes out instead every `every_s` seconds or every `every_n` steps, whichever comes
first:

    epoch 2: step 40/200 (20%)  loss 0.8123  1.92 it/s  ETA 1:23

tqdm has no mode that prints lines on a clock, and rich's live display is terminal-only too, hence this
small wrapper. It never reads a device tensor: the loss shown is whatever the loop last passed to
`set_postfix`, i.e. the value its periodic host read already brought back.

    progress = ProgressLog(len(loader), "eval", enabled=True)
    for batch in progress.wrap(loader):
        ...
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

log = logging.getLogger("masksweep.progress")

_T = TypeVar("_T")
DEFAULT_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """A tqdm bar on a terminal, else a log line every `every_s` seconds or `every_n` steps.

    `enabled=False` shows nothing. `stream` decides terminal or not (default: stderr, where tqdm draws).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        every_s: float = DEFAULT_EVERY_S,
        every_n: int | None = None,
        stream: TextIO | None = None,
        unit: str = "step",
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s, self.every_n = every_s, every_n
        self.done = 0
        self._postfix: dict[str, str] = {}
        self._bar: Any = None
        stream = stream or sys.stderr
        self._lines = enabled and not stream.isatty()
        if enabled and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)
        self._start = self._last_time = time.monotonic()
        self._last_done = 0

    def wrap(self, items: Iterable[_T]) -> Iterator[_T]:
        """Yield `items`, counting one step each time the loop body has finished with one."""
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def set_postfix(self, **values: str) -> None:
        """Values shown with the next line or bar refresh, e.g. loss="0.8123" (already on the host)."""
        self._postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = time.monotonic()
            by_steps = self.every_n is not None and self.done - self._last_done >= self.every_n
            if by_steps or now - self._last_time >= self.every_s:
                log.info("%s", self.line(now))
                self._last_time, self._last_done = now, self.done

    def line(self, now: float | None = None) -> str:
        """`desc: step 40/200 (20%)  loss 0.81  1.92 it/s  ETA 1:23`."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = 100 * self.done / max(self.total, 1)
        parts = [f"{self.desc}: {self.unit} {self.done}/{self.total} ({percent:.0f}%)"]
        parts += [f"{key} {value}" for key, value in self._postfix.items()]
        parts.append(f"{rate:.2f} it/s")
        if rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
