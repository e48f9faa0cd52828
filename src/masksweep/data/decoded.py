"""The full decode of the val and test images before training, remembered per file.

A truncated image passes the header checks every split gets when it is built; only decoding it finds it. The
val and test splits define the AP and are small, so each of their files is decoded once before the first
epoch (and before any pretraining or model build) and remembered in the user's cache by (path, size, mtime):
the next run over the same files decodes only what changed. The train split is not decoded up front
(`PersonDataset.skip_unreadable` drops what fails while training).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from masksweep import cache
from masksweep.data.images import check_decodes

log = logging.getLogger(__name__)


def check_files_decode(files: Sequence[Path], where: str) -> None:
    """Decode each of `files` unless already decoded at its current size and mtime; the first that fails
    raises DataError naming it. `where` names the split for the log line."""
    record = _record_path(files)
    known = set(record.read_text().splitlines()) if record.is_file() else set()
    keys = [_key(path) for path in files]
    todo = [(path, key) for path, key in zip(files, keys, strict=True) if key not in known]
    if not todo:
        return
    tic = time.perf_counter()
    for path, _ in todo:
        check_decodes(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(sorted(set(keys))) + "\n")
    os.replace(tmp, record)  # atomic: parallel workers checking the same split never read half a record
    log.info(
        "%s: decoded %d image files in full (%.1fs; %d known good), remembered in %s",
        where,
        len(todo),
        time.perf_counter() - tic,
        len(files) - len(todo),
        record,
    )


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}"


def _record_path(files: Sequence[Path]) -> Path:
    """One record per set of files (a split), so that it holds only that split's keys."""
    digest = hashlib.sha256("\n".join(sorted(map(str, files))).encode()).hexdigest()[:16]
    return cache.cache_dir() / "decoded" / f"{digest}.txt"
