"""Hydra's sweep grammar -> Optuna distributions, and trial params -> job overrides.

The grammar is the one of Hydra's Optuna sweeper, parsed with Hydra's own OverridesParser:
  choice(a, b) / a,b (command line)   CategoricalDistribution; choices may be config-group options
  range(5, 10[, step])                IntDistribution(5, 9, step) - Hydra's range excludes its stop, as in
                                      `-m epochs=range(5,10)` with the basic sweeper; float steps give a
                                      stepped FloatDistribution; shuffle(range(...)) gives a categorical
  interval(a, b)                      FloatDistribution(a, b); int(interval(a, b)) IntDistribution(a, b)
  tag(log, interval(...))             the same with log=True (also tag(log, range(a, b)) with step 1)
  anything else                       a fixed override, passed to every job as written
Note: Hydra's Optuna sweeper maps range(5, 10) to 5..10 inclusive; here the stop is excluded, like everywhere
else in Hydra.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_PRIMITIVES = (str, int, float, bool, type(None))


class SearchSpaceError(ValueError):
    """A `hydra.sweeper.params` entry (or a command-line sweep) cannot become an Optuna distribution."""


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    # How each param is written in a job override (keeps `+`/`++` prefixes and `@package`).
    override_keys: dict[str, str] = field(default_factory=dict)
    # Choices that were lists/dicts, stored in Optuna as their override text and written back verbatim.
    verbatim: dict[str, set[str]] = field(default_factory=dict)
    # Non-sweep overrides, passed unchanged to every job.
    fixed: list[str] = field(default_factory=list)

    def job_overrides(self, params: Mapping[str, Any]) -> list[str]:
        out = list(self.fixed)
        for name, value in params.items():
            key = self.override_keys.get(name, name)
            raw = isinstance(value, str) and value in self.verbatim.get(name, set())
            out.append(f"{key}={value if raw else format_value(value)}")
        return out

    def describe(self) -> dict[str, str]:
        return {name: repr(dist) for name, dist in self.distributions.items()}


def parse_search_space(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> SearchSpace:
    """`hydra.sweeper.params` then the command-line task overrides; a later entry for the same key wins."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    parser = OverridesParser.create()
    parsed: dict[str, Override] = {}
    for override in parser.parse_overrides(lines):
        # Keyed without +/++ so `lr=...` on the command line replaces `lr: ...` from the sweep config.
        parsed.pop(_param_name(override), None)
        parsed[_param_name(override)] = override

    space = SearchSpace()
    for name, override in parsed.items():
        if not override.is_sweep_override():
            space.fixed.append(override.input_line or f"{override.get_key_element()}={_value_text(override)}")
            continue
        dist, verbatim = to_distribution(name, override)
        space.distributions[name] = dist
        space.override_keys[name] = override.get_key_element()
        if verbatim:
            space.verbatim[name] = verbatim
    return space


def _param_name(override: Override) -> str:
    return (
        override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
    )


def _value_text(override: Override) -> str:
    return override.get_value_element_as_str()


def to_distribution(name: str, override: Override) -> tuple[BaseDistribution, set[str]]:
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    log = "log" in tags

    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices: list[Any] = []
        verbatim: set[str] = set()
        # Transformer.encode keeps primitives and writes lists/dicts as override text. One pass only:
        # sweep_iterator() reshuffles a shuffle() on every call.
        for raw in override.sweep_iterator():
            encoded = Transformer.encode(raw)
            if not isinstance(encoded, _PRIMITIVES):
                raise SearchSpaceError(f"{name}: choice {raw!r} has an unsupported type {type(raw).__name__}")
            if not isinstance(raw, _PRIMITIVES):
                verbatim.add(str(encoded))
            choices.append(encoded)
        if not choices:
            raise SearchSpaceError(f"{name}: empty choice")
        if log:
            raise SearchSpaceError(f"{name}: tag(log, ...) applies to interval() or range(), not to a choice")
        if isinstance(value, RangeSweep):
            choices = sorted(choices)  # shuffle() has no meaning for a categorical
        return CategoricalDistribution(choices), verbatim

    if isinstance(value, RangeSweep):
        items = list(override.sweep_iterator())
        if not items:
            raise SearchSpaceError(f"{name}: {override.input_line!r} is an empty range")
        low, high = min(items), max(items)
        step = abs(value.step)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items) and float(step).is_integer():
            if log and step != 1:
                raise SearchSpaceError(f"{name}: a log range needs step 1, got {step}")
            return IntDistribution(int(low), int(high), log=log, step=1 if log else int(step)), set()
        if log:
            raise SearchSpaceError(f"{name}: a log range must be an integer range with step 1")
        return FloatDistribution(float(low), float(high), step=float(step)), set()

    if isinstance(value, IntervalSweep):
        assert value.start is not None and value.end is not None
        if value.start > value.end:
            raise SearchSpaceError(f"{name}: interval start {value.start} is above its end {value.end}")
        if log and value.start <= 0:
            raise SearchSpaceError(f"{name}: a log interval must start above 0, got {value.start}")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log), set()
        return FloatDistribution(float(value.start), float(value.end), log=log), set()

    raise SearchSpaceError(
        f"{name}: {override.input_line!r} is not supported (use choice, range or interval)"
    )


def grid_values(name: str, dist: BaseDistribution) -> list[Any]:
    """The finite list of values of a distribution, for GridSampler. Continuous intervals have none."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = round((dist.high - dist.low) / dist.step)
        return [round(dist.low + i * dist.step, 12) for i in range(n + 1)]
    raise SearchSpaceError(
        f"sampler grid needs a finite set of values, but '{name}' is a continuous interval ({dist!r}); "
        "use choice(...) or range(...) for it, or another sampler"
    )


def grid_space(space: SearchSpace) -> dict[str, list[Any]]:
    return {name: grid_values(name, dist) for name, dist in space.distributions.items()}


# ---------------------------------------------------------------------------------------------- overrides
_PARSER: OverridesParser | None = None


def format_value(value: Any) -> str:
    """Write a param value so that Hydra's override parser reads back exactly `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    text = str(value)
    if "${" not in text and _reads_back(text):
        return text  # plain words stay unquoted, e.g. a config-group option: optimizer=adam
    return quote(text)


def _reads_back(text: str) -> bool:
    global _PARSER
    if _PARSER is None:
        _PARSER = OverridesParser.create()
    try:
        override = _PARSER.parse_override(f"k={text}")
    except Exception:
        return False
    return not override.is_sweep_override() and isinstance(override.value(), str) and override.value() == text


def quote(text: str) -> str:
    """A single-quoted override value that Hydra parses and OmegaConf resolves back to `text` verbatim."""
    # Backslashes only act as escapes before a quote, before `${` and at the end of a quoted string.
    out = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, text)
    out = out.replace("'", "\\'").replace("${", "\\${")
    return f"'{out}'"
