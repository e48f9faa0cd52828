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

A YAML syntax error in any of these files is one line naming the file, line and column. Hydra does not wrap
PyYAML's errors: composing raises them bare, and `masksweep-train`'s Hydra prints the parser's 90-line
traceback before our code runs, so `masksweep-train` parses the files it may read first (`check_yaml_syntax`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

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
    except yaml.MarkedYAMLError as exc:
        raise MasksweepError(yaml_error_line(exc)) from None
    except HydraException as exc:
        # Hydra's messages span lines (the available options follow on their own lines): keep one line.
        raise MasksweepError(f"config error: {' '.join(str(exc).split())}") from None


def yaml_error_line(exc: yaml.MarkedYAMLError) -> str:
    """'config error: FILE line L, column C: PROBLEM' (1-based, as editors count) for a YAML syntax error."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return f"config error: invalid YAML: {problem}"
    name = Path(mark.name)
    if name.is_absolute() and name.is_relative_to(Path.cwd()):
        name = name.relative_to(Path.cwd())  # a user's own file, as they typed its directory
    return f"config error: {name} line {mark.line + 1}, column {mark.column + 1}: {problem}"


def check_yaml_syntax(argv: Sequence[str]) -> None:
    """Parse every config file a `masksweep-train` command line may read (the shipped ones, and those under
    `--config-dir` and `hydra.searchpath=[file://...]`); the first syntax error raises
    MasksweepError naming the file. Only parsed, not constructed: what the values mean is Hydra's to check."""
    for path in _config_files(_search_dirs(argv)):
        try:
            with path.open("rb") as handle:
                for _ in yaml.parse(handle, Loader=_LOADER):
                    pass
        except yaml.MarkedYAMLError as exc:
            raise MasksweepError(yaml_error_line(exc)) from None
        except yaml.YAMLError as exc:  # not text at all (a bad byte): no line to point at
            raise MasksweepError(f"config error: {path}: {' '.join(str(exc).split())}") from None


# libyaml's parser when PyYAML has it: the ~60 shipped files parse in a few milliseconds.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _search_dirs(argv: Sequence[str]) -> list[Path]:
    """The shipped config directory and the user's, as Hydra's own arguments and overrides name them."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config-dir", "-cd")
    known, rest = parser.parse_known_args(list(argv))
    dirs = [CONFIG_DIR, *([Path(known.config_dir)] if known.config_dir else [])]
    for override in rest:
        if override.lstrip("+~").startswith("hydra.searchpath="):
            dirs.extend(_file_entries(override))
    return [d.expanduser() for d in dirs if d.expanduser().is_dir()]


def _file_entries(override: str) -> Iterable[Path]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(override).value()
    except HydraException:
        return []  # a malformed override: Hydra itself reports it, in its own words
    entries = [str(e) for e in (value if isinstance(value, list) else [value])]
    return [Path(e.removeprefix("file://")) for e in entries if "://" not in e or e.startswith("file://")]


def _config_files(dirs: Iterable[Path]) -> Iterable[Path]:
    """Hydra's configs (`*.yaml`) under each directory, in groups up to _MAX_GROUP_DEPTH deep (which also ends
    a symlink loop: links are followed, as the shipped `sweep` group is one), without hidden folders."""
    for root in dict.fromkeys(d.resolve() for d in dirs):
        for folder, subdirs, files in os.walk(root, followlinks=True):
            deep = len(Path(folder).relative_to(root).parts) >= _MAX_GROUP_DEPTH
            subdirs[:] = [] if deep else sorted(d for d in subdirs if not d.startswith("."))
            yield from (Path(folder) / f for f in sorted(files) if f.endswith(".yaml"))


# Nested config groups go 2 deep here (hydra/help); a user's deeper ones would be unusual.
_MAX_GROUP_DEPTH = 3
