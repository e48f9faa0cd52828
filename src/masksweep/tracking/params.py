"""What a run records about its inputs: the flattened config, provenance, and copies with secrets masked."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import masksweep
from masksweep.tracking.store import redact_uri

# Config keys that may hold credentials (database URLs) or are machine-local plumbing: never logged as params.
PRIVATE_KEYS = ("optuna.storage", "tracking.uri")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}, without the private keys."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in PRIVATE_KEYS:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The run's params that come from the config: the flattened resolved config, private keys left out."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def git_output(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(masksweep.__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, str]:
    """Code and library versions for the run's params (never the environment: it may hold secrets)."""
    import torch
    import torchvision

    commit = git_output("rev-parse", "HEAD")
    status = git_output("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)),
        "version.masksweep": masksweep.__version__,
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
    }


def redacted_config(cfg: DictConfig) -> DictConfig:
    """The resolved config with the passwords of the private keys' URLs masked (the logged config.yaml)."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PRIVATE_KEYS:
        value = OmegaConf.select(resolved, key, default=None)
        if isinstance(value, str):
            OmegaConf.update(resolved, key, redact_uri(value), merge=False)
    return resolved


def redacted_hydra_dir(src: Path, dst: Path) -> Path:
    """A copy of a `.hydra` folder without secrets: URL passwords masked (overrides carry optuna.storage,
    hydra.yaml the sweeper's storage) and the values of `hydra.job.env_set` blanked."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        text = redact_uri(path.read_text(errors="replace"))
        target = dst / path.name
        target.write_text(text)
        if path.name == "hydra.yaml":
            with contextlib.suppress(Exception):  # not a Hydra file after all: the URL masking still applies
                hydra_yaml = OmegaConf.load(target)
                env_set = OmegaConf.select(hydra_yaml, "hydra.job.env_set", default=None)
                if env_set:
                    for name in list(env_set):
                        env_set[name] = "<redacted>"
                    OmegaConf.save(hydra_yaml, target)
    return dst
