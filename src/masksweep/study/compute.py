"""What a study's trials cost, and what early stopping saved.

Each trial records its own compute in the Optuna user attr `compute` (the job side, `trial_compute`), so it
survives whichever worker or job ran it:
  {"device": "cuda" | "cpu", "devices": GPUs or cores, "wall_s": seconds, "device_s": GPU- or core-seconds,
   "epochs_planned": the configured epochs, "epochs_done": epochs trained, fractional for a stop mid-epoch}
Each sweeper process records its slots (`masksweep:slots:<worker id>`: {"slots", "busy_s", "wall_s"}).

`study_compute` sums them:
- device_hours: every trial's device-seconds, stopped and failed ones included;
- saved_device_hours: for each PRUNED trial (pruner or divergence), the epochs it did not train times its own
  measured device-seconds per epoch: (epochs_planned - epochs_done) * device_s / epochs_done;
- slot_utilization: busy slot-time / (slots x wall time), over every worker of the study.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

COMPUTE_ATTR = "compute"
SLOTS_ATTR_PREFIX = "masksweep:slots:"


def trial_compute(
    device: str, devices: int, wall_s: float, device_s: float, epochs_planned: int, epochs_done: float
) -> dict[str, Any]:
    return {
        "device": device,
        "devices": int(devices),
        "wall_s": round(float(wall_s), 3),
        "device_s": round(float(device_s), 3),
        "epochs_planned": int(epochs_planned),
        "epochs_done": round(float(epochs_done), 4),
    }


def saved_seconds(compute: dict[str, Any]) -> float:
    done, planned = float(compute.get("epochs_done", 0)), float(compute.get("epochs_planned", 0))
    if done <= 0 or planned <= done:
        return 0.0
    return (planned - done) * float(compute.get("device_s", 0)) / done


def study_compute(trials: list[FrozenTrial], slots: list[dict[str, Any]]) -> dict[str, float]:
    from optuna.trial import TrialState

    spent = saved = 0.0
    for t in trials:
        compute = t.user_attrs.get(COMPUTE_ATTR)
        if not isinstance(compute, dict):
            continue
        spent += float(compute.get("device_s", 0))
        if t.state == TrialState.PRUNED:
            saved += saved_seconds(compute)
    out = {"device_hours": spent / 3600, "saved_device_hours": saved / 3600}
    capacity = sum(float(s["slots"]) * float(s["wall_s"]) for s in slots if s.get("wall_s"))
    if capacity > 0:
        out["slot_utilization"] = sum(float(s["busy_s"]) for s in slots) / capacity
    return out


class SlotClock:
    """One sweeper process's slots: how long each trial held one, against slots x the sweep's wall time."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.started = time.time()
        self.busy_s = 0.0

    def add(self, seconds: float) -> None:
        self.busy_s += max(0.0, seconds)

    def record(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "busy_s": round(self.busy_s, 3),
            "wall_s": round(time.time() - self.started, 3),
        }


class ComputeClock:
    """A trial's wall time and device-seconds since the last lap: GPU-seconds (wall time x GPUs) on a GPU,
    core-seconds on the CPU (this process's CPU time over all its threads, x the trial's processes)."""

    def __init__(self, device_type: str, processes: int = 1) -> None:
        self.device_type, self.processes = device_type, max(1, int(processes))
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        wall_s, cpu_s = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        per_process = wall_s if self.device_type == "cuda" else cpu_s
        return wall_s, per_process * self.processes
