"""Count host syncs made by the training loop's own code (not by the model or the optimizer).

On a CPU there is no device to wait for, so the count is of the calls that *would* wait on a GPU: reading a
tensor's value on the host (item, tolist, bool/float/int, numpy) and uploading a Python value to the device
with a blocking copy (torch.tensor(..., device=...)). Calls inside the model's forward and the optimizer's
step are torchvision's and torch's own and are left out, so the count is what masksweep's loop adds.
"""

from __future__ import annotations

import linecache
import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "numpy"}
UPLOADS = {"tensor", "as_tensor"}


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", "")
            if name in READS:
                self.counts[f"{name} at {self._site()}"] += 1
            elif name in UPLOADS and kwargs.get("device") is not None:
                self.counts[f"torch.{name}(device=...) at {self._site()}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str:
        """The line of the training loop (train_one_epoch) that led to the call, with its source text."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_name != "train_one_epoch":
            frame = frame.f_back
        if frame is None:
            return "?"
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        return f"engine.py:{frame.f_lineno} `{line[:60]}`"

    @staticmethod
    def epoch_end(site: str) -> bool:
        """Reads done once per epoch, after the loop (not per step)."""
        return "`detector.check()" in site or "`means = " in site

    # Hooks that pause counting inside the model and the optimizer step.
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Any]:
        def pause(*_: Any, **__: Any) -> None:
            self.paused += 1

        def resume(*_: Any, **__: Any) -> None:
            self.paused -= 1

        return [
            model.register_forward_pre_hook(pause),
            model.register_forward_hook(resume),
            optimizer.register_step_pre_hook(pause),
            optimizer.register_step_post_hook(resume),
        ]
