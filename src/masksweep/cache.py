"""The one per-user cache of what masksweep builds once and reuses: the pretrained tiny preset, the synthetic
data and the record of val/test images already decoded in full.

Resolved as torch.hub and pip resolve theirs: `$MASKSWEEP_CACHE_DIR`, else `$XDG_CACHE_HOME/masksweep`, else
`~/.cache/masksweep`. It does not depend on the working directory, so a new directory does not pay the
5-minute pretraining again; move it by setting MASKSWEEP_CACHE_DIR (or by moving the folder there).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MASKSWEEP_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root (absolute; not created here: writers create what they write)."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "masksweep").absolute()


def resolve(configured: str | os.PathLike[str] | None, default_subdir: str) -> Path:
    """A config's `cache_dir`: the value as given (relative to the working directory), or, for null, the
    `default_subdir` of the user's cache."""
    if configured is None or str(configured) == "":
        return cache_dir() / default_subdir
    return Path(configured).expanduser().absolute()
