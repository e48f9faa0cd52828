"""Where Hydra put this job: the multirun's sweep directory, the job number and the `.hydra` folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def sweep_dir() -> Path | None:
    """The multirun's sweep directory when this process runs a Hydra multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).absolute() if hydra_cfg.mode == RunMode.MULTIRUN else None


def hydra_job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    if sweep_dir() is None:
        return None
    return OmegaConf.select(HydraConfig.get(), "job.num", default=None)


def hydra_output_dir() -> Path | None:
    """The job's `.hydra` folder, when Hydra wrote one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    return Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir)
