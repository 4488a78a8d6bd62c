"""Recipe checkpoints: written atomically, so a crash mid-write never leaves a truncated file.

The write itself is ``swa_fast.checkpoint_average.save_atomic`` (temporary
file in the same directory, fsync, ``os.replace``): readers see the old
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from swa_fast.checkpoint_average import save_atomic as _save_atomic


def save_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj)`` to ``path`` (parent directories created) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(obj, path)
    return path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a recipe checkpoint onto the CPU (``load_state_dict`` moves tensors where they belong)."""
    # weights_only=False: the checkpoint holds metric rows next to the tensors; it is this program's own file.
    return torch.load(Path(path), map_location="cpu", weights_only=False)
