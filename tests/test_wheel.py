"""masksweep as a user installs it: the wheel built from this checkout, installed (non-editable) into a bare
venv and run from an empty directory with the checkout off the path, so its configs can only come from the
installed package (`pkg://masksweep.conf`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow

# What the build reads, copied first: building in the shared checkout would leave build/ and *.egg-info there.
BUILD_INPUTS = ("pyproject.toml", "README.md", "src", "conf", "sweeps")
TRIALS = [f"trial{n}" for n in range(1, 7)]


def _check(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command[:3]}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            # symlinks=True: the copy keeps src/masksweep/conf -> ../../conf, as a checkout has it.
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."]
    _check([sys.executable, "-m", *pip_wheel], cwd=source)
    (built,) = dist.glob("masksweep-*.whl")
    return built


@dataclass
class Installed:
    """A venv holding only the wheel; its dependencies come from the test venv's site-packages."""

    venv: Path
    site: Path

    def env(self) -> dict[str, str]:
        dropped = ("PYTHONPATH", "PYTHONHOME", "HYDRA_FULL_ERROR")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return _check([str(self.venv / "bin" / script), *args], cwd, self.env())

    def train(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return self.run("masksweep-train", *args, cwd=cwd)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv")
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv)
    python = venv / "bin" / "python"
    # pip runs under the new venv's interpreter, so the console scripts are that venv's own.
    pip_install = ["pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    _check([sys.executable, "-m", *pip_install], venv)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_check([str(python), "-c", purelib], venv).stdout.strip())
    # The dependencies, as a plain path line: that directory's own .pth files, among them the editable
    # install's link to this checkout, are not processed. Written after the install, so that pip does not
    # take the checkout's editable masksweep for the one to upgrade.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return Installed(venv, site)


def repo_configs() -> set[str]:
    """conf/**.yaml as the package must hold them: sweeps/ as sweep/, whatever conf/sweep is in a checkout."""
    conf = REPO / "conf"
    found = {
        (Path(root) / name).relative_to(conf).as_posix()
        for root, _, names in os.walk(conf)  # does not follow the conf/sweep link
        for name in names
        if name.endswith(".yaml")
    }
    return {p for p in found if not p.startswith("sweep/")} | {
        f"sweep/{p.name}" for p in (REPO / "sweeps").glob("*.yaml")
    }


def test_the_wheel_holds_every_config_as_a_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        entries = archive.infolist()
    assert [e.filename for e in entries if stat.S_ISLNK(e.external_attr >> 16)] == []
    prefix = "masksweep/conf/"
    shipped = {e.filename[len(prefix) :] for e in entries if e.filename.startswith(prefix)}
    assert "__init__.py" in shipped  # Hydra's pkg:// source needs a regular package
    assert {p for p in shipped if p.endswith(".yaml")} == repo_configs()
    assert {"sweep/seed_table.yaml", "hydra/help/masksweep.yaml"} <= shipped


def test_the_installed_package_runs_not_the_checkout(installed: Installed, tmp_path: Path) -> None:
    code = (
        "import json, sys, masksweep, hydra_plugins.masksweep_optuna as plugin;"
        "print(json.dumps([masksweep.__file__, plugin.__file__, sys.path]))"
    )
    package, plugin, path = json.loads(installed.run("python", "-c", code, cwd=tmp_path).stdout)
    assert Path(package).is_relative_to(installed.site) and Path(plugin).is_relative_to(installed.site)
    assert str(REPO / "src") not in path
    sweep = installed.site / "masksweep" / "conf" / "sweep"
    assert sweep.is_dir() and not sweep.is_symlink()


def test_sweep_seed_table_composes_from_the_package(installed: Installed, tmp_path: Path) -> None:
    shown = installed.train("sweep=seed_table", "--cfg", "hydra", cwd=tmp_path).stdout
    hydra = yaml.safe_load(shown)["hydra"]
    main_source = {"provider": "main", "schema": "pkg", "path": "masksweep.conf"}
    assert main_source in hydra["runtime"]["config_sources"]
    assert hydra["sweeper"]["_target_"].endswith("MasksweepOptunaSweeper")
    assert hydra["sweeper"]["params"] == {"experiment": f"choice({', '.join(TRIALS)})"}
    assert list(tmp_path.iterdir()) == []  # composing writes nothing


def test_a_smoke_trial_then_evaluate_and_predict(
    installed: Installed, tmp_path: Path, synthetic_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    cache = f"data.cache_dir={synthetic_cache}"
    trained = installed.train(*TINY_OVERRIDES, cache, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "AP segm" in trained.stdout
    checkpoint = run_dir / "checkpoints" / "last.pt"
    assert checkpoint.is_file()

    data = [cache, "data.num_train=4", "data.num_val=2"]
    scored = installed.run("masksweep", "evaluate", "--checkpoint", str(checkpoint), *data, cwd=tmp_path)
    assert "ap_segm: " in scored.stdout

    Image.new("RGB", (64, 64), (90, 120, 150)).save(tmp_path / "street.png")
    out = tmp_path / "predicted"
    predict = ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "street.png"), "--out", str(out)]
    installed.run("masksweep", *predict, "--score-threshold", "0", cwd=tmp_path)
    assert (out / "street_instances.png").is_file() and (out / "predictions.json").is_file()


def test_a_two_trial_seed_table_sweep(installed: Installed, tmp_path: Path, synthetic_cache: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = installed.train(
        "-m",
        "sweep=seed_table",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY_OVERRIDES,
        f"data.cache_dir={synthetic_cache}",
        cwd=tmp_path,
    )
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert [trial["state"] for trial in results["trials"]] == ["COMPLETE", "COMPLETE"]
    experiments = {trial["params"]["experiment"] for trial in results["trials"]}
    assert len(experiments) == 2 and experiments <= set(TRIALS)
    for trial in results["trials"]:  # the report's name next to Optuna's number, in the results and the log
        assert trial["trial_name"] == trial["params"]["experiment"]
        assert f"{trial['trial_name']} (#{trial['number']}) COMPLETE" in result.stdout + result.stderr


@pytest.fixture
def user_configs(tmp_path: Path) -> Path:
    """A user's own experiment, dataset and sweep, in their own directory (the README's layout)."""
    user = tmp_path / "myconf"
    files = {
        "experiment/mine.yaml": """# @package _global_
defaults:
  - override /optimizer: adam
  - override /data: small_synthetic
trial_name: mine
lr: 0.0123
momentum: null
""",
        "data/small_synthetic.yaml": """defaults:
  - synthetic
  - _self_
num_train: 3
""",
        "sweep/my_lr.yaml": """# @package _global_
defaults:
  - override /hydra/sweeper: masksweep_optuna
hydra:
  sweeper:
    study_name: my-lr
    params:
      lr: choice(0.001, 0.002)
""",
    }
    for name, text in files.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    return user


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_config_dir_experiment_composes(installed: Installed, user_configs: Path, how: str) -> None:
    cwd = user_configs.parent
    if how == "--config-dir":
        added = ["--config-dir", str(user_configs)]
    else:
        added = [f"hydra.searchpath=[file://{user_configs}]"]
    job = yaml.safe_load(installed.train(*added, "experiment=mine", "--cfg", "job", cwd=cwd).stdout)
    assert (job["trial_name"], job["lr"]) == ("mine", 0.0123)
    assert job["optimizer"]["_target_"] == "torch.optim.Adam"
    assert job["data"]["num_train"] == 3 and job["data"]["num_val"] is not None  # extends the shipped one

    shown = installed.train(*added, "sweep=my_lr", "--cfg", "hydra", "-p", "hydra.sweeper.params", cwd=cwd)
    assert yaml.safe_load(shown.stdout) == {"lr": "choice(0.001, 0.002)"}


def test_help_lists_a_users_options_next_to_the_shipped_ones(
    installed: Installed, user_configs: Path
) -> None:
    shown = installed.train("--config-dir", str(user_configs), "--help", cwd=user_configs.parent).stdout
    assert shown.startswith("masksweep-train: ")
    assert f"experiment: {', '.join(['mine', *TRIALS])}\n" in shown
    assert "sweep: lr_wd, my_lr, seed_table, tpe\n" in shown
