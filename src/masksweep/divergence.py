"""Stop an exploding trial within a few steps, without a host sync on every step.

All checks are tensor ops on the loss's device; the host reads one small tensor every `sync_every` steps.
The first bad step is latched on the device, so the reported step and value are exact even when the
host looks later.

Two rules, so that neither needs to know the loss scale in advance:
- relative: a loss above `factor` x the median of the healthy losses seen so far (the last `window` of
  them). It applies from step `warmup_steps + 1` (default: the second step, judged against the first), so an
  explosion in the first steps is caught whatever the dataset's loss scale;
- absolute: a loss above `max_loss` (null turns it off), for a trial that is bad from its first step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from masksweep.errors import TrialDiverged

# Reason codes, latched on the device. 0 = healthy.
REASONS = {
    1: "non-finite loss",
    2: "non-finite gradient norm",
    3: "loss above divergence.max_loss",
    4: "loss above divergence.factor x running median",
}


class DivergenceDetector:
    def __init__(
        self,
        enabled: bool = True,
        max_loss: float | None = 100.0,
        factor: float = 10.0,
        window: int = 50,
        warmup_steps: int = 1,
        sync_every: int = 4,
        action: str = "prune",
    ) -> None:
        self.enabled, self.max_loss, self.factor = enabled, max_loss, factor
        self.window, self.warmup_steps, self.sync_every = window, warmup_steps, max(1, sync_every)
        self.action = action
        self.steps_seen = 0
        self._history: torch.Tensor | None = None
        self._latched: torch.Tensor | None = None  # [code, step, value]; code 0 = nothing seen yet

    def _init_buffers(self, device: torch.device) -> None:
        self._history = torch.full((self.window,), math.nan, device=device)
        self._latched = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Check one step's total loss (and gradient norm). Raises TrialDiverged when the host looks."""
        if not self.enabled:
            return
        if self._history is None:
            self._init_buffers(loss.device)
        assert self._history is not None and self._latched is not None
        loss = loss.detach().float()
        code = torch.zeros((), dtype=torch.float64, device=loss.device)
        if self.steps_seen >= max(1, self.warmup_steps):  # the median of nothing is NaN: no rule yet
            spike = loss > self.factor * torch.nanmedian(self._history)
            code = torch.where(spike, 4.0, code)
        if self.max_loss is not None:
            code = torch.where(loss > self.max_loss, 3.0, code)
        if grad_norm is not None:
            code = torch.where(torch.isfinite(grad_norm), code, 2.0)
        code = torch.where(torch.isfinite(loss), code, 1.0)

        first = (self._latched[0] == 0) & (code > 0)
        # torch.full, not torch.tensor: on a GPU torch.tensor(value, device=...) is a blocking host-to-device
        # copy (a host sync every step); torch.full launches a fill kernel with the value as its argument.
        step_value = torch.full((), float(step), dtype=torch.float64, device=loss.device)
        candidate = torch.stack([code, step_value, loss.double()])
        self._latched = torch.where(first, candidate, self._latched)
        # Only healthy losses feed the running median, so one spike does not raise the bar for the next.
        self._history[self.steps_seen % self.window] = torch.where(code == 0, loss, math.nan)
        self.steps_seen += 1
        if self.steps_seen % self.sync_every == 0:
            self.check()

    def check(self) -> None:
        """Host-side look at the latched state (one sync). Call at epoch end too."""
        if self._latched is None:
            return
        code, step, value = self._latched.tolist()
        if code:
            raise TrialDiverged(REASONS[int(code)], step=int(step), value=value, detected_at=self.steps_seen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_seen": self.steps_seen,
            "history": None if self._history is None else self._history.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = state["steps_seen"]
        if state["history"] is not None:
            self._init_buffers(state["history"].device)
            self._history = state["history"].clone()
