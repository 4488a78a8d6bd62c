"""Atomic checkpoint files: a crash mid-write never leaves a truncated checkpoint behind.

``save_atomic`` writes to a temporary file in the same directory, flushes it to
disk, then ``os.replace``\\ s it over the target: readers see the old file or
the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU (tensors are moved by ``load_state_dict``)."""
    # weights_only=False: the checkpoint holds metric rows and RNG states next to the tensors; it is our own file.
    return torch.load(Path(path), map_location="cpu", weights_only=False)
