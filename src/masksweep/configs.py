"""Where masksweep's Hydra configs live, and composing them outside `masksweep-train`.

The configs are the package `masksweep.conf`, read by Hydra's `pkg://` config source (importlib.resources),
so an installed masksweep finds them whatever the working directory, never through a path computed from a
source checkout.

How the files get into the package: the repo keeps `conf/` and `sweeps/` at the top level, where users look
first; `src/masksweep/conf` is a symlink to `../../conf`, and `conf/sweep` one to `../sweeps`. setuptools
follows both links when it builds a wheel or an sdist and copies the files, so an installed package holds
real directories (tests/test_wheel.py checks the wheel has every yaml file and no symlink), while the
editable install of a checkout reads the very same files through the links. A build hook copying conf/ and
sweeps/ would fill the wheel the same way, but an editable install would then have no `masksweep.conf`,
and checkouts would need a second lookup.

A user's own configs join through Hydra's search path: `--config-dir DIR` or `hydra.searchpath=[file://DIR]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from masksweep.errors import ConfigError, MasksweepError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONFIG_MODULE = "masksweep.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # what @hydra.main is given
CONFIG_NAME = "train"
# The same files on disk, for code that lists a group's options; Hydra itself reads CONFIG_PATH.
CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def with_config_dir(config_dir: Path | None, overrides: Sequence[str]) -> list[str]:
    """The overrides plus a user's config directory, added as `masksweep-train --config-dir DIR` adds it:
    for commands that compose with compose_train(), as Hydra's compose API has no config_dir argument."""
    if config_dir is None:
        return list(overrides)
    if not config_dir.is_dir():
        raise ConfigError("--config-dir", str(config_dir), "an existing directory of Hydra configs")
    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        raise ConfigError("--config-dir", str(config_dir), "--config-dir or hydra.searchpath, not both")
    return [f"hydra.searchpath=['file://{config_dir.resolve()}']", *overrides]


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """The training config as `masksweep-train` composes it, with Hydra overrides (`hydra.searchpath=[...]`
    among them adds a user's configs). A bad override ends as one MasksweepError line."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except HydraException as exc:
        # Hydra's messages span lines (the available options follow on their own lines): keep one line.
        raise MasksweepError(f"config error: {' '.join(str(exc).split())}") from None
