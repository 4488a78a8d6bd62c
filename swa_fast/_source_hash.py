"""Fingerprint of the C++/CUDA sources, shared by setup.py and the import check.

setup.py bakes the fingerprint into ``swa_fast._C``; on import, an editable
checkout recomputes it from ``csrc/`` and refuses a ``_C`` built from other
sources (a stale build gives wrong answers far more quietly than a missing one).
This file must not import torch or swa_fast: setup.py loads it by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_files(csrc: Path, with_cuda: bool) -> list[Path]:
    """The kernel sources a build compiles, in a stable order (csrc/cuda only for CUDA builds)."""
    return sorted(
        p
        for p in csrc.rglob("*")
        if p.suffix in SOURCE_SUFFIXES and (with_cuda or "cuda" not in p.relative_to(csrc).parts)
    )


def source_hash(csrc: Path, with_cuda: bool) -> str:
    """A short sha256 over the relative paths and contents of the sources."""
    digest = hashlib.sha256()
    for path in source_files(csrc, with_cuda):
        digest.update(path.relative_to(csrc).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
