"""MLflow tracking: what a trial records, how it ends, sweeps as parent runs, and the shared SQLite store."""

from __future__ import annotations

import csv
import http.server
import io
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES
from masksweep import cli, engine
from masksweep.errors import TrackingError, TrialDiverged
from masksweep.tracking import (
    PRIVATE_KEYS,
    check_reachable,
    config_params,
    open_client,
    redact_uri,
    redacted_hydra_dir,
    start_tracker,
)
from masksweep.tracking.tracker import _random_run_name
from masksweep.train import train

SECRET = "hunter2-not-a-real-password"
PROVENANCE = {
    "git.commit",
    "git.dirty",
    "version.masksweep",
    "version.torch",
    "version.torchvision",
    "data.fingerprint",
    "world_size",  # processes of the trial (DDP)
}


def store_client(workdir: Path):
    client, _ = open_client(None, create=False)
    assert client.tracking_uri == f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    return client


def only_run(client, experiment: str = "masksweep"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_tiny_trial_is_recorded_exactly(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MASKSWEEP_TEST_TOKEN", SECRET)  # environment variables never reach MLflow
    cfg = make_cfg(f"optuna.storage='postgresql://optuna:{SECRET}@db.example/optuna'", "trial_name=tiny")
    metrics = train(cfg)
    client = store_client(workdir)
    run = client.get_run(metrics["run_id"])

    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.tags["masksweep.trial_name"] == "tiny"
    assert run.info.artifact_uri.startswith((workdir / "mlruns" / "artifacts").as_uri())
    # Params: exactly the flattened resolved config (less the private keys) plus provenance.
    expected = config_params(cfg)
    assert not any(key in expected for key in PRIVATE_KEYS)
    assert set(run.data.params) == set(expected) | PROVENANCE
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.params["lr"] == str(cfg.lr) and run.data.params["optimizer._target_"] == "torch.optim.SGD"
    assert len(run.data.params["data.fingerprint"]) == 16 and run.data.params["world_size"] == "1"
    # Metrics: the final values train() returned, bit for bit, and per-step / per-epoch series.
    for key, value in metrics.items():
        if key != "run_id":
            assert run.data.metrics[key] == value, key
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in steps] == [1, 2]  # smoke trainer: 2 steps, logged every step
    assert {
        "train/lr",
        "train/loss_classifier",
        "train/epoch_loss",
        "time/epoch_seconds",
        "time/images_per_second",
        "val/iou_instance_mean",
    } <= set(run.data.metrics)
    # Artifacts: the resolved config (secret masked), the curves, the overlays.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "overlays"} <= artifacts
    overlays = sorted(a.path for a in client.list_artifacts(run.info.run_id, "overlays"))
    assert overlays == [f"overlays/val_{i:06d}.png" for i in (1, 2)]  # the images of the last evaluation
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))).read_text()
    assert OmegaConf.create(config_text).lr == cfg.lr
    everything = " ".join([config_text, *run.data.params.values(), *run.data.tags.values()])
    assert SECRET not in everything
    assert "postgresql://optuna:***@db.example/optuna" in config_text
    # `masksweep compare` shows the same numbers.
    assert cli.main(["compare", "--format", "csv", "--no-chart"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (row["Trial"], row["Run ID"], row["Status"]) == ("tiny", run.info.run_id, "FINISHED")
    assert float(row["AP segm"]) == metrics["val/ap_segm"]
    assert float(row["Global IoU"]) == metrics["val/iou_global"]
    assert float(row["Loss (last epoch)"]) == metrics["final/loss_last_epoch"]


def test_failed_trial_is_recorded_and_the_error_propagates(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom in the engine")

    monkeypatch.setattr(engine, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="boom in the engine"):
        train(make_cfg())
    client = store_client(workdir)
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom in the engine"
    assert run.info.end_time is not None
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(run.data.params) > 50  # the inputs were logged before training started


def test_stopped_trial_is_killed_with_its_reason(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverging(*args, **kwargs):
        raise TrialDiverged("loss 2.1e+21 > max_loss 1000", step=7, value=2.1e21)

    monkeypatch.setattr(engine, "train_one_epoch", diverging)
    with pytest.raises(TrialDiverged):
        train(make_cfg())
    run = only_run(store_client(workdir))
    assert run.info.status == "KILLED"
    tags = run.data.tags
    assert (tags["stop.kind"], tags["stop.step"], tags["stop.value"]) == ("diverged", "7", "2.1e+21")
    assert tags["stop.reason"] == "loss 2.1e+21 > max_loss 1000"
    assert "error" not in tags


def test_unreachable_server_fails_before_training(
    make_cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("trained without tracking"))
    uri = f"http://tracker:{SECRET}@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as info:
        train(make_cfg(f"tracking.uri='{uri}'"))
    message = str(info.value)
    assert "\n" not in message and "unreachable" in message
    assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in message
    assert SECRET not in message and "tracker:***@" in message
    assert not (workdir / "mlruns").exists()


def test_server_that_answers_with_an_error_is_reachable() -> None:
    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://user:pw@127.0.0.1:{server.server_port}")  # behind auth, but up
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable(f"postgresql://u:p@127.0.0.1:{free_port()}/db", timeout=2)


def test_tracking_none_records_nothing(make_cfg, workdir: Path) -> None:
    tracker = start_tracker(make_cfg("tracking=none"))
    with tracker.recording():
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.run_id is None
    assert not (workdir / "mlruns").exists()


def test_redaction_masks_passwords_and_env_set(tmp_path: Path) -> None:
    assert redact_uri("postgresql+psycopg2://u:pa55@h:5432/db") == "postgresql+psycopg2://u:***@h:5432/db"
    assert (
        redact_uri("sqlite:////tmp/x.db and http://host:5000/path")
        == "sqlite:////tmp/x.db and http://host:5000/path"
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "overrides.yaml").write_text(f"- optuna.storage=postgresql://u:{SECRET}@h/db\n- lr=0.1\n")
    (src / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    env_set:\n      API_TOKEN: {SECRET}\n  sweeper:\n"
        f"    storage: mysql://root:{SECRET}@db/optuna\n"
    )
    out = redacted_hydra_dir(src, tmp_path / "out")
    text = "".join(p.read_text() for p in out.iterdir())
    assert SECRET not in text and "lr=0.1" in text and "API_TOKEN" in text


def test_run_names_leave_the_seeded_random_stream_alone() -> None:
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    names = {_random_run_name() for _ in range(5)}
    assert random.random() == expected
    assert len(names) > 1  # not derived from the trial's seed


def test_importing_train_and_the_cli_does_not_import_mlflow() -> None:
    code = (
        "import sys, masksweep.train, masksweep.cli, masksweep.tracking; "
        "sys.exit(1 if 'mlflow' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _hammer(root: str, worker: int, queue) -> None:
    """A sweep worker's worth of writes: runs, params, batched metrics, on a shared (fresh) store."""
    try:
        os.chdir(root)
        from mlflow.entities import Metric, Param

        from masksweep.tracking import experiment_id

        client, artifacts = open_client(None)
        exp = experiment_id(client, "masksweep", artifacts)
        for n in range(3):
            run = client.create_run(exp, run_name=f"w{worker}-{n}").info.run_id
            client.log_batch(run, params=[Param(f"p{i}", str(i)) for i in range(60)])
            for step in range(15):
                client.log_batch(run, metrics=[Metric(f"m{i}", float(step), 0, step) for i in range(8)])
            client.set_terminated(run, "FINISHED")
        queue.put(None)
    except BaseException as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_parallel_workers_share_a_fresh_sqlite_store(workdir: Path) -> None:
    # Unprotected, several processes creating the same fresh store fail ("duplicate column", "locked").
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(str(workdir), k, queue)) for k in range(4)]
    for proc in workers:
        proc.start()
    results = [queue.get(timeout=300) for _ in workers]
    for proc in workers:
        proc.join(timeout=60)
    assert results == [None] * 4, results
    client = store_client(workdir)
    runs = client.search_runs([client.get_experiment_by_name("masksweep").experiment_id])
    assert len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(r.data.params) == 60 and r.data.metrics["m7"] == 14.0 for r in runs)


@pytest.mark.slow
def test_multirun_is_a_parent_run_with_nested_trials(workdir: Path, synthetic_cache: Path) -> None:
    exe = Path(sys.executable).with_name("masksweep-train")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args = ["-m", "lr=0.001,0.002", *TINY_OVERRIDES, f"data.cache_dir={synthetic_cache}"]
    result = subprocess.run(
        [str(exe), *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = store_client(workdir)
    exp = client.get_experiment_by_name("masksweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("masksweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(r.data.params["lr"] for r in children) == ["0.001", "0.002"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_name for r in children) == ["job-0", "job-1"]
    # Each trial carries its own Hydra config folder.
    assert ".hydra" in {a.path for a in client.list_artifacts(children[0].info.run_id)}
    sweep_dirs = list((workdir / "multirun").glob("*/*/mlflow_parent_run_id"))
    assert len(sweep_dirs) == 1 and sweep_dirs[0].read_text() == parent.info.run_id


def test_resume_finds_a_runs_checkpoint_dir(make_cfg, workdir: Path) -> None:
    from masksweep.tracking import checkpoint_dir_of_run, experiment_id

    cfg = make_cfg()
    with pytest.raises(TrackingError, match="no MLflow store"):
        checkpoint_dir_of_run(cfg, "0" * 32)
    client, artifacts = open_client(None)
    exp = experiment_id(client, "masksweep", artifacts)
    run = client.create_run(exp, tags={"masksweep.checkpoint_dir": str(workdir / "ckpt")}).info.run_id
    assert checkpoint_dir_of_run(cfg, run) == workdir / "ckpt"
    with pytest.raises(TrackingError, match="neither a checkpoint file"):
        checkpoint_dir_of_run(cfg, "0" * 32)
    bare = client.create_run(exp).info.run_id
    with pytest.raises(TrackingError, match="recorded no checkpoint directory"):
        checkpoint_dir_of_run(cfg, bare)


def sweep_config(workdir: Path, study: str | None = None):
    return OmegaConf.create(
        {
            "tracking": {"enabled": True, "uri": None, "experiment_name": "masksweep"},
            "optimized_metric": "val/ap_segm",
            "hydra": {
                "sweep": {"dir": str(workdir / "multirun" / "s1")},
                "overrides": {"task": ["lr=0.1,0.2"]},
                **({"sweeper": {"study_name": study}} if study else {}),
            },
        }
    )


def test_sweep_parent_run_logs_the_summary_and_resumes_its_study(workdir: Path) -> None:
    from masksweep.tracking import PARENT_RUN_FILE, SWEEP_RESULTS_FILE, SweepRunCallback

    config = sweep_config(workdir, study="s")
    callback = SweepRunCallback()
    callback.on_multirun_start(config)
    sweep = workdir / "multirun" / "s1"
    parent = (sweep / PARENT_RUN_FILE).read_text()
    (sweep / SWEEP_RESULTS_FILE).write_text(
        f"study_name: s\nstorage: postgresql://u:{SECRET}@db/optuna\n"
        "best:\n  value: 0.5\n  params:\n    lr: 0.1\n"
        "counts:\n  complete: 2\n"
    )
    (sweep / "optimization_history.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    callback.on_multirun_end(config)
    client = store_client(workdir)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["masksweep.role"] == "sweep"
    assert run.data.metrics["best.value"] == 0.5 and run.data.metrics["counts.complete"] == 2
    assert run.data.params["sweep.overrides"] == "lr=0.1,0.2"
    artifacts = {a.path for a in client.list_artifacts(parent)} | {
        a.path for a in client.list_artifacts(parent, "plots")
    }
    assert {SWEEP_RESULTS_FILE, "plots/optimization_history.png"} <= artifacts
    logged = Path(client.download_artifacts(parent, SWEEP_RESULTS_FILE, str(workdir))).read_text()
    assert SECRET not in logged and "postgresql://u:***@db/optuna" in logged
    # A study's own parent run (adopted on a rerun, shared by its workers): tests/test_study.py.


def test_sweep_that_dies_leaves_its_parent_failed(workdir: Path) -> None:
    from masksweep.tracking import SweepRunCallback

    callback = SweepRunCallback()
    callback.on_multirun_start(sweep_config(workdir))
    parent = callback.run_id
    callback._end_unfinished()  # what the exit hook does when Hydra never reached on_multirun_end
    run = store_client(workdir).get_run(parent)
    assert run.info.status == "FAILED" and "before Hydra's on_multirun_end" in run.data.tags["error"]


