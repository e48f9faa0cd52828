"""DDP trials on the CPU: two gloo processes started by torchrun, as a user starts them.

This file is also the worker of the equivalence test: `torchrun ... tests/test_ddp.py OUT BATCH` trains a
few steps in a process group and rank 0 saves the weights, the same script without torchrun trains them in
one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_OVERRIDES, signal_once_logged

BIN = Path(sys.executable).parent
# The val count is odd on purpose: 3 images over 2 ranks.
TINY = [*TINY_OVERRIDES, "data.num_val=3", "device=cpu"]
STEPS = 2  # K steps of the equivalence test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# One thread per process: two processes on a 2-core machine.
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "OMP_NUM_THREADS": "1"}


def torchrun_command(args: list[str]) -> list[str]:
    """`torchrun --nproc_per_node=2 ...`, its rendezvous on 127.0.0.1."""
    port = f"--master_port={_free_port()}"
    return [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", port, *args]


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Killed after `timeout` seconds: a hung collective fails the test instead of hanging the suite."""
    return subprocess.run(
        torchrun_command(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def train_args(overrides: list[str]) -> list[str]:
    return ["--no-python", str(BIN / "masksweep-train"), *TINY, *overrides]


def train_cli(overrides: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return torchrun(train_args(overrides), cwd, timeout)


def mlflow_runs(cwd: Path) -> tuple:
    from mlflow import MlflowClient

    # Absolute: MLflow caches a store per URI string, so a relative one would reach another test's file.
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("masksweep").experiment_id])


# ---------------------------------------------------------------------------------------------- units


def test_one_process_has_no_process_group_and_identity_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    from masksweep import distributed

    for key in ("RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    with distributed.process_group(torch.device("cpu"), timeout_s=0) as world:  # no group: timeout unused
        assert world == distributed.World() and world.main and not world.distributed
        assert not torch.distributed.is_initialized()
        values = torch.tensor([1.0, 2.0])
        assert distributed.mean_over_ranks(values) is values
        assert distributed.sampler(list(range(5)), train=False, seed=0) is None
        assert distributed.broadcast_from_main({"a": 1}) == {"a": 1}
        with pytest.raises(ValueError, match="plain"), distributed.stop_together():
            raise ValueError("plain")  # one process: the block's error as it is


def test_a_bad_timeout_is_one_config_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from masksweep import distributed
    from masksweep.errors import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="trainer.ddp_timeout_s=0"), distributed.process_group(
        torch.device("cpu"), timeout_s=0
    ):
        pass


def test_merged_shards_score_like_one_evaluator() -> None:
    """COCOEvaluator.merge: images 0 and 2 in one evaluator, 1 in another, merged = all three in one."""
    from masksweep.metrics import COCOEvaluator

    def item(image_id: int, shift: int) -> tuple[dict, dict]:
        masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
        masks[0, 4:12, 4:12] = 1
        pred = torch.zeros(2, 1, 16, 16)
        pred[0, 0, 4 + shift : 12 + shift, 4:12] = 0.9
        pred[1, 0, 0:3, 0:3] = 0.7
        target = {
            "image_id": image_id,
            "masks": masks,
            "boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]),
            "labels": torch.ones(1, dtype=torch.int64),
            "iscrowd": torch.zeros(1, dtype=torch.int64),
        }
        output = {
            "masks": pred,
            "boxes": torch.tensor([[4.0, 4.0 + shift, 12.0, 12.0 + shift], [0.0, 0.0, 3.0, 3.0]]),
            "scores": torch.tensor([0.9, 0.6]),
            "labels": torch.ones(2, dtype=torch.int64),
        }
        return target, output

    items = [item(i, shift) for i, shift in enumerate([0, 3, 1])]
    whole = COCOEvaluator(backend="pycocotools")
    whole.process(*zip(*items, strict=True))
    shards = [COCOEvaluator(backend="pycocotools") for _ in range(2)]
    for index, (target, output) in enumerate(items):
        shards[index % 2].process([target], [output])
    shards[0].merge(shards[1].state())
    expected, merged = whole.evaluate(), shards[0].evaluate()
    assert 0 < expected["ap_segm"] < 1 and 0 < expected["iou_image_mean"] < 1  # a case that can differ
    assert merged == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="processed twice"):
        shards[0].merge(shards[1].state())


# ---------------------------------------------------------------------------------------------- 2 processes


def _equivalence_worker(out: Path, batch_size: int, cache: Path) -> None:
    """Train STEPS steps of the tiny model with every norm frozen and a deterministic sampler, in this
    process group (or alone); rank 0 saves the weights and the logged losses to `out`."""
    from omegaconf import OmegaConf
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    from torchvision.ops.misc import FrozenBatchNorm2d

    from masksweep import distributed, engine
    from masksweep.configs import compose_train
    from masksweep.data import build_datasets, collate
    from masksweep.divergence import DivergenceDetector
    from masksweep.train import instantiate_model, make_loader, seed_everything

    class FirstSampler(BalancedPositiveNegativeSampler):
        """Takes the first positives and negatives by index instead of a random draw: an image's samples
        then do not depend on which process or batch slot drew them from the global RNG."""

        def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list, list]:
            positives, negatives = [], []
            for labels in matched_idxs:
                pos, neg = torch.where(labels >= 1)[0], torch.where(labels == 0)[0]
                num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
                num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
                for chosen, masks in ((pos[:num_pos], positives), (neg[:num_neg], negatives)):
                    mask = torch.zeros_like(labels, dtype=torch.uint8)
                    mask[chosen] = 1
                    masks.append(mask)
            return positives, negatives

    def freeze_norms(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.load_state_dict(
                    {k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"}
                )
                setattr(module, name, frozen)
            else:
                freeze_norms(child)

    # Mask R-CNN normalises each loss by the samples of the whole batch (RPN anchors, RoIs, positive RoIs):
    # 2 x b equals 1 x 2b only when every image has as many samples. Small sample budgets that every image
    # fills (1 positive + 1 negative anchor, 1 + 3 RoIs; a ground-truth box is always a positive) make it so.
    # No flips: a random augmentation draws from each process's own RNG, not in one process's order.
    cfg = compose_train(
        [
            *TINY,
            "data.num_train=8",
            "data.hflip=0",
            f"data.cache_dir={cache}",
            f"trainer.batch_size={batch_size}",
            "model.detector.rpn_batch_size_per_image=2",
            "model.detector.box_batch_size_per_image=4",
        ]
    )
    with distributed.process_group(torch.device("cpu"), timeout_s=120) as world:
        generator = seed_everything(cfg.seed)
        train_set = build_datasets(cfg.data).train
        model = instantiate_model(OmegaConf.to_container(cfg.model, resolve=True))
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        freeze_norms(model)
        model.rpn.fg_bg_sampler = FirstSampler(2, 0.5)
        model.roi_heads.fg_bg_sampler = FirstSampler(4, 0.25)
        if world.distributed:  # the production path: DistributedSampler shards of the seeded shuffle
            loader = make_loader(train_set, cfg, train=True, generator=generator)
        else:  # the same shuffle, unsharded: each batch is the union of the two ranks' batches
            loader = DataLoader(
                train_set,
                batch_size=batch_size,
                sampler=DistributedSampler(train_set, 1, 0, shuffle=True, seed=cfg.seed),
                collate_fn=collate,
            )
        distributed.set_epoch(loader, 1)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
        logged: dict[int, dict[str, float]] = {}
        options = engine.StepOptions(grad_clip_norm=10.0, log_every=1, limit_batches=STEPS)
        engine.train_one_epoch(
            distributed.wrap(model, torch.device("cpu")),
            optimizer,
            loader,
            torch.device("cpu"),
            1,
            0,
            DivergenceDetector(),
            options,
            on_log=lambda step, values: logged.__setitem__(step, values),
        )
        if world.main:
            torch.save({"initial": initial, "weights": model.state_dict(), "logged": logged}, out)


@pytest.mark.slow
def test_two_processes_of_batch_b_train_like_one_of_batch_2b(tmp_path: Path) -> None:
    """Item 7: K steps of 2 processes x batch 2 give the weights (and the logged, rank-averaged losses) of
    1 process x batch 4, with BatchNorm frozen."""
    cache = tmp_path / "cache"
    single = subprocess.run(
        [sys.executable, __file__, "equivalence", str(tmp_path / "one.pt"), "4", str(cache)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torchrun([__file__, "equivalence", str(tmp_path / "two.pt"), "2", str(cache)], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    assert sorted(one["logged"]) == sorted(two["logged"]) == list(range(1, STEPS + 1))
    for step, values in one["logged"].items():
        assert two["logged"][step] == pytest.approx(values, rel=1e-5), step
    trained = {k: v for k, v in one["weights"].items() if k in one["initial"] and v.is_floating_point()}
    for name, weight in trained.items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    moved = max((weight - one["initial"][name]).abs().max().item() for name, weight in trained.items())
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance


@pytest.mark.slow
def test_a_torchrun_trial_is_one_run_scored_like_one_process_evaluate(tmp_path: Path) -> None:
    """Items 1, 3, 4: `torchrun --nproc_per_node=2 masksweep-train` is one MLflow run with world_size 2;
    its val metrics over an odd val count (3 images on 2 ranks) equal `masksweep evaluate` of its
    checkpoint in one process to 1e-9, and its predictions cover every val image once."""
    from masksweep.rescore import rescore

    directory = tmp_path / "checkpoints"
    overrides = [
        "trainer.limit_val_batches=null",
        "eval.export_predictions=true",
        f"checkpoint.dir={directory}",
        f"data.cache_dir={tmp_path}",
    ]
    result = train_cli(overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)[1]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    predictions = json.loads((directory / "predictions.json").read_text())
    assert len({p["image_id"] for p in predictions}) == 3  # every val image, from both ranks

    _, metrics = rescore(directory / "last.pt", [], torch.device("cpu"))
    logged = {k.removeprefix("val/"): v for k, v in run.data.metrics.items() if k.startswith("val/")}
    assert set(metrics) <= set(logged)
    assert any(metrics.values())  # a model that detects something: equality below is not 0 == 0 everywhere
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_a_diverging_ddp_trial_stops_both_ranks_killed(tmp_path: Path) -> None:
    """Item 5: lr=50 diverges; both ranks stop at the same host sync, each with one line, and the one run
    ends KILLED with the reason. The subprocess timeout keeps a hung rank from hanging the suite."""
    result = train_cli(
        ["lr=50", "data.num_train=24", "trainer.limit_train_batches=12", f"data.cache_dir={tmp_path}/c"],
        tmp_path,
        timeout=240,
    )
    assert result.returncode != 0
    stops = [line for line in result.stderr.splitlines() if line.startswith("masksweep-train: trial")]
    # Rank 1 exits on its own and prints its line; rank 0, the run's recorder, usually too, unless torchrun's
    # SIGTERM (sent when rank 1 exits non-zero) ends it first: its stop is the KILLED run below.
    assert stops and all(line == stops[0] for line in stops), result.stderr[-3000:]  # one step for all
    assert "diverged" in stops[0]
    client, runs = mlflow_runs(tmp_path)
    (run,) = runs
    assert run.info.status == "KILLED"
    assert run.data.tags["stop.kind"] == "diverged"
    assert f"at step {run.data.tags['stop.step']}:" in stops[0]
    # Stopped within divergence.sync_every (4) steps of the bad one, and its curve runs up to the stop.
    step, detected = int(run.data.tags["stop.step"]), int(run.data.tags["stop.detected_at"])
    assert step <= detected < step + 4
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, detected + 1))


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_the_trial_resumes_on_two(tmp_path: Path) -> None:
    """Items 5 and 6: SIGTERM to torchrun (as SLURM's scancel or a Ctrl-C reaches every process) in epoch 2
    ends the one run KILLED with epoch 1's checkpoint on disk; `resume=` on two processes finishes it."""
    from masksweep import checkpoint

    ck = tmp_path / "ck"
    overrides = [
        "epochs=2",
        "data.num_train=8",
        "trainer.progress=true",
        "trainer.progress_every_n_steps=1",
        f"checkpoint.dir={ck}",
        f"data.cache_dir={tmp_path}",
    ]
    command = torchrun_command(train_args(overrides))
    status, stderr = signal_once_logged(command, tmp_path, "epoch 2: step 1/", signal.SIGTERM, ENV)
    assert status != 0, stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    (killed,) = runs
    assert killed.info.status == "KILLED"
    saved = checkpoint.load(ck / checkpoint.LAST)
    assert saved["progress"]["epoch"] == 1 and "optimizer" in saved

    resumed = train_cli([*overrides, f"resume={ck / checkpoint.LAST}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = [r for r in mlflow_runs(tmp_path)[1] if r.info.run_id != killed.info.run_id]
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ap_segm")] == [1, 2]


def unreadable_on_rank_1(split: str, **keys: Any) -> Any:
    """`data._target_` of the test below: the synthetic data, whose train images rank 1 cannot read after
    the contract check's first read (a node with a bad disk): a DataError mid-epoch on one rank only."""
    from masksweep.data.synthetic import synthetic
    from masksweep.errors import DataError

    dataset = synthetic(split, **keys)
    if split != "train" or os.environ.get("RANK") != "1":
        return dataset
    base, reads = type(dataset), iter(range(1_000_000))

    class Unreadable(base):
        def __getitem__(self, index: int) -> Any:
            if next(reads) >= 1:
                raise DataError(f"image {index}: unreadable on this node")
            return base.__getitem__(self, index)

    dataset.__class__ = Unreadable
    return dataset


@pytest.mark.slow
def test_a_data_error_on_one_rank_fails_the_run_with_its_cause(tmp_path: Path) -> None:
    """Item 5: rank 1 fails mid-epoch while rank 0 waits for it in DDP's gradient all-reduce; the one run
    ends FAILED with rank 1's error (not KILLED by torchrun's SIGTERM, nor a connection error)."""
    overrides = ["data._target_=test_ddp.unreadable_on_rank_1", f"data.cache_dir={tmp_path}"]
    env = {**ENV, "PYTHONPATH": str(Path(__file__).parent)}
    command = torchrun_command(train_args(overrides))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("masksweep-train: ")]
    cause = lines[0].removeprefix("masksweep-train: ")  # rank 1's own line, printed before it exits
    assert re.fullmatch(r"image \d+: unreadable on this node", cause), result.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)[1]
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == f"StoppedElsewhere: rank 1 failed: DataError: {cause}"


def _stop_worker(out_dir: Path) -> None:
    """Two agreements: rank 0's pruner stops rank 1; an error on rank 1 only (a bad image) stops rank 0.
    Then a failure outside any agreement: rank 0 stops with rank 1's error."""
    from masksweep import distributed
    from masksweep.errors import TrialPruned

    with distributed.process_group(torch.device("cpu"), timeout_s=60) as world:
        outcomes = []
        for failing, error in ((0, TrialPruned("pruned here", step=3)), (1, ValueError("bad image x.png"))):
            try:
                with distributed.stop_together():
                    if world.rank == failing:
                        raise error
                outcomes.append("went on")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        # Last, as it breaks the group: rank 1 fails between agreements while rank 0 waits in a collective.
        try:
            with distributed.peer_failures():
                if world.rank == 1:
                    raise ValueError("bad image y.png")
                torch.distributed.barrier()  # broken by rank 1 leaving: a connection error, the symptom
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        (out_dir / f"rank{world.rank}.json").write_text(json.dumps(outcomes))


def test_a_stop_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    result = torchrun([__file__, "stop", str(tmp_path)], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = "TrialPruned: trial pruned at step 3: pruned here"
    assert json.loads((tmp_path / "rank0.json").read_text()) == [
        pruned,
        "StoppedElsewhere: rank 1 failed: ValueError: bad image x.png",
        "StoppedElsewhere: rank 1 failed: ValueError: bad image y.png",  # the cause, not the symptom
    ]
    assert json.loads((tmp_path / "rank1.json").read_text()) == [
        pruned,
        "ValueError: bad image x.png",
        "ValueError: bad image y.png",
    ]


@pytest.mark.slow
@pytest.mark.slurm
def test_a_slurm_sweep_with_two_tasks_per_node_runs_ddp_trials(
    slurm_cluster, workdir: Path, synthetic_cache: Path
) -> None:
    """Item 2: `hydra.launcher.tasks_per_node=2` makes each trial of a SLURM sweep one 2-process job; both
    trials COMPLETE, each with one MLflow run of world size 2."""
    from optuna.trial import TrialState

    from test_slurm_sweeps import env, slurm_sweep
    from test_sweep_e2e import runs_of, study_of

    command = slurm_sweep(
        synthetic_cache,
        workdir,
        "ddp",
        "hydra.launcher.tasks_per_node=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "lr=choice(0.001, 0.002)",
        "device=cpu",
        "trainer.ddp_timeout_s=120",  # a rank that cannot meet the other fails in minutes, not half an hour
    )
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=600, env=env(slurm_cluster)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t.state for t in study_of(workdir, "ddp").trials] == [TrialState.COMPLETE] * 2
    runs = runs_of(workdir, "ddp")
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == ["0", "1"]  # one run per trial
    assert all(r.info.status == "FINISHED" and r.data.params["world_size"] == "2" for r in runs)


if __name__ == "__main__":  # the workers of the tests above, under torchrun or alone
    if sys.argv[1] == "equivalence":
        _equivalence_worker(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        _stop_worker(Path(sys.argv[2]))
