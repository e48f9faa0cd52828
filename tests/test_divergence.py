"""The divergence detector stops exploding losses within sync_every steps and names the first bad step."""

from __future__ import annotations

import math

import pytest
import torch

from masksweep.divergence import DivergenceDetector
from masksweep.errors import TrialDiverged


def feed(detector: DivergenceDetector, losses: list[float], grad_norms: list[float] | None = None) -> int:
    """Feed losses until the detector raises; returns how many steps it took."""
    for step, loss in enumerate(losses, start=1):
        grad = None if grad_norms is None else torch.tensor(grad_norms[step - 1])
        detector.update(step, torch.tensor(loss), grad)
    detector.check()
    return len(losses)


@pytest.mark.parametrize(
    "bad,reason",
    [(math.nan, "non-finite loss"), (math.inf, "non-finite loss"), (2e21, "loss above divergence.max_loss")],
)
def test_bad_loss_stops_within_sync_every_steps(bad: float, reason: str) -> None:
    detector = DivergenceDetector(sync_every=4, warmup_steps=100)
    losses = [1.0] * 9 + [bad] + [bad] * 10
    with pytest.raises(TrialDiverged) as info:
        for step, loss in enumerate(losses, start=1):
            detector.update(step, torch.tensor(loss))
            seen = step
    assert info.value.step == 10  # the first bad step, latched on the device
    assert info.value.reason == reason
    assert seen - info.value.step < 4  # noticed at the next host look
    assert info.value.value == pytest.approx(bad, rel=1e-6) or math.isnan(info.value.value)


def test_spike_over_running_median_after_warmup() -> None:
    detector = DivergenceDetector(factor=10, warmup_steps=5, sync_every=1, max_loss=1e9)
    with pytest.raises(TrialDiverged) as info:
        feed(detector, [2.0, 1.8, 1.7, 1.6, 1.5, 1.4, 30.0])
    assert info.value.step == 7 and "median" in info.value.reason


def test_spike_during_warmup_is_tolerated() -> None:
    detector = DivergenceDetector(factor=10, warmup_steps=5, sync_every=1, max_loss=1e9)
    feed(detector, [2.0, 40.0, 1.7, 1.6, 1.5, 1.4, 1.3])


def test_non_finite_gradient_norm() -> None:
    detector = DivergenceDetector(sync_every=1)
    with pytest.raises(TrialDiverged, match="gradient"):
        feed(detector, [1.0, 1.0, 1.0], grad_norms=[1.0, math.inf, 1.0])


def test_healthy_training_and_disabled_detector_pass() -> None:
    feed(DivergenceDetector(sync_every=1, warmup_steps=3), [3.0 * 0.95**i for i in range(60)])
    feed(DivergenceDetector(enabled=False), [math.nan, 1e30])


def test_state_round_trip_keeps_the_median_window() -> None:
    detector = DivergenceDetector(factor=10, warmup_steps=3, sync_every=1, max_loss=1e9)
    feed(detector, [1.0, 1.0, 1.0, 1.0])
    restored = DivergenceDetector(factor=10, warmup_steps=3, sync_every=1, max_loss=1e9)
    restored.load_state_dict(detector.state_dict())
    with pytest.raises(TrialDiverged):
        restored.update(5, torch.tensor(50.0))


def test_stop_and_config_errors_survive_pickling() -> None:
    # Process launchers (joblib, submitit) ship a job's exception back to the sweeper by pickle.
    import pickle

    from masksweep.errors import ConfigError

    diverged = pickle.loads(pickle.dumps(TrialDiverged("non-finite loss", step=7, value=math.inf)))
    assert (type(diverged), diverged.reason, diverged.step, diverged.value) == (
        TrialDiverged,
        "non-finite loss",
        7,
        math.inf,
    )
    error = pickle.loads(pickle.dumps(ConfigError("lr", -1, "a float > 0")))
    assert str(error) == str(ConfigError("lr", -1, "a float > 0"))
