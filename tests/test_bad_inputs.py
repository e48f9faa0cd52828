"""Bad inputs end before any work: non-zero exit, one line naming the option in the tool's own syntax, no
traceback, and no run recorded FINISHED (issue 12, items 7 and 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from masksweep.errors import TrackingError
from masksweep.train import train

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prog), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def corrupt_checkpoint(directory: Path) -> Path:
    path = directory / "last.pt"
    path.write_bytes(b"PK\x03\x04 not a whole zip file")
    return path


@NO_GPU
def test_train_on_cuda_without_a_gpu(workdir: Path) -> None:
    assert_one_line(
        run("masksweep-train", "device=cuda", cwd=workdir), "masksweep-train:", "device='cuda'", "cpu"
    )
    assert not (workdir / "mlruns").exists()  # checked before the run was created


@NO_GPU
def test_predict_on_cuda_without_a_gpu(workdir: Path) -> None:
    result = run(
        "masksweep", "predict", "--checkpoint", "x.pt", "--device", "cuda", "--out", "o", "a.png", cwd=workdir
    )
    assert_one_line(result, "masksweep predict:", "--device='cuda'")


def test_corrupt_checkpoint_in_train_names_the_file_not_pytorchs_advice(workdir: Path) -> None:
    path = corrupt_checkpoint(workdir)
    line = assert_one_line(
        run("masksweep-train", f"resume={path}", cwd=workdir), "masksweep-train:", str(path)
    )
    assert "resume=" in line and "weights_only=False" not in line and "issue" not in line
    assert not (workdir / "mlruns").exists()


def test_corrupt_checkpoint_in_predict_names_its_own_option(workdir: Path) -> None:
    path = corrupt_checkpoint(workdir)
    result = run("masksweep", "predict", "--checkpoint", str(path), "--out", "o", "a.png", cwd=workdir)
    line = assert_one_line(result, "masksweep predict:", "--checkpoint", str(path))
    assert "resume" not in line and "weights_only=False" not in line and "issue" not in line


@pytest.mark.parametrize("weights", ["/no/such/weights.pt", "NO_SUCH_WEIGHTS"])
def test_model_weights_errors_are_not_wrapped_by_hydra(workdir: Path, weights: str) -> None:
    result = run("masksweep-train", f"model.weights={weights}", cwd=workdir)
    line = assert_one_line(result, "masksweep-train:", f"model.weights={weights!r}")
    assert "Error in call to target" not in result.stderr and "instantiate" not in line
    assert not (workdir / "mlruns").exists()


def test_train_hints_name_the_hydra_key(workdir: Path) -> None:
    result = run("masksweep-train", "tracking.uri=sqlite:////no-such-dir-masksweep/x.db", cwd=workdir)
    line = assert_one_line(result, "masksweep-train:", "tracking.uri=")
    assert "--tracking-uri" not in line
    assert not Path("/no-such-dir-masksweep").exists()


def test_cli_hints_name_the_command_line_option(workdir: Path) -> None:
    result = run(
        "masksweep", "compare", "--tracking-uri", "sqlite:////no-such-dir-masksweep/x.db", cwd=workdir
    )
    line = assert_one_line(result, "masksweep compare:", "--tracking-uri")
    assert "tracking.uri=" not in line


def test_unreachable_tracking_fails_before_data_and_pretraining(make_cfg, monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the tracking store was checked")

    import masksweep.data
    import masksweep.model

    monkeypatch.setattr(masksweep.data, "build_datasets", must_not_run)
    monkeypatch.setattr(masksweep.model, "ensure_pretrained", must_not_run)  # where build_model calls it
    cfg = make_cfg("tracking.uri=http://127.0.0.1:9", "++model.pretrain.enabled=true")
    with pytest.raises(TrackingError, match=r"tracking.uri='http://127.0.0.1:9' is unreachable"):
        train(cfg)


def test_unreachable_tracking_in_a_subprocess_leaves_no_pretraining_behind(workdir: Path) -> None:
    cache = workdir / "pretrained"
    args = (
        "tracking.uri=http://127.0.0.1:9",
        f"model.pretrain.cache_dir={cache}",
        f"data.cache_dir={workdir / 'd'}",
    )
    assert_one_line(run("masksweep-train", *args, cwd=workdir), "masksweep-train:", "unreachable")
    assert not cache.exists() and not (workdir / "d").exists()
