"""Checkpoints that are never half-written, and a resume that survives one that is.

Lightning's own writer stages a checkpoint in the system temp folder and moves it: across filesystems the move is a
copy into the final name, so a kill or a full disk leaves a truncated last.ckpt (and an orphan in the temp folder).
`AtomicCheckpointIO` (the Trainer's `plugins=`) writes beside the target under a temporary name, fsyncs, renames,
and keeps the last.ckpt it replaces as last.prev.ckpt; `load_with_fallback` resumes from that one when last.ckpt
does not load.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from fsspec.utils import get_protocol
from pytorch_lightning.plugins import TorchCheckpointIO

from metriclab.core.atomic import atomic_write, remove_stale_temporaries
from metriclab.core.checkpoint import previous_path
from metriclab.core.errors import ConfigError

log = logging.getLogger(__name__)

#: the temporary name's suffix: `.last.ckpt.<random>.ckpt-tmp` beside last.ckpt
TMP_SUFFIX = ".ckpt-tmp"


def is_complete(path: Path) -> bool:
    """Whether `path` is a whole checkpoint file, read cheaply: torch writes zip archives, whose directory is at the
    end, so a truncated one has none."""
    return zipfile.is_zipfile(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint format, written all or nothing in the target's folder.

    A failed write (a full disk, an exception) leaves the old file intact and no temporary file; a killed one
    leaves a temporary file beside the target, removed by the next write of that target. Checkpoints whose stem is
    in `keep_previous` keep the file they replace as `previous_path(target)` (when that file is whole)."""

    def __init__(self, keep_previous: Iterable[str] = ("last",)):
        super().__init__()
        self.keep_previous = set(keep_previous)

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or get_protocol(str(path)) not in ("file", "local"):
            # remote storage has no rename to make atomic: Lightning's writer (and its storage_options error)
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        previous = previous_path(target)
        for stale in remove_stale_temporaries(target, TMP_SUFFIX) + remove_stale_temporaries(previous, ".tmp"):
            log.info("removed %s, left by a write that was killed", stale)
        keep = None
        if target.stem in self.keep_previous and target.is_file():
            if is_complete(target):
                keep = previous
            else:  # the previous one (if any) stays the fallback
                log.warning("%s is incomplete: not keeping it as %s", target, previous.name)
        atomic_write(target, lambda tmp: _torch_save(checkpoint, tmp), suffix=TMP_SUFFIX, keep_previous=keep)


def _torch_save(checkpoint: Dict[str, Any], tmp: str) -> None:
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)


def load_with_fallback(path: Path | str, load: Callable[[Path], Dict[str, Any]]) -> Tuple[Path, Dict[str, Any]]:
    """`(path, load(path))`; when `path` is missing or does not load (`load` raises ConfigError) and its previous
    checkpoint loads, `(previous, load(previous))` with a warning naming both."""
    path = Path(path)
    try:
        return path, load(path)
    except ConfigError as e:
        error = e
    previous = previous_path(path)
    if not previous.is_file():
        raise error
    try:
        ckpt = load(previous)
    except ConfigError as e:
        raise ConfigError(f"{error}; its previous checkpoint does not load either: {e}") from e
    log.warning("checkpoint %s does not load (%s): resuming from the previous checkpoint %s instead", path, error,
                previous)
    return previous, ckpt
