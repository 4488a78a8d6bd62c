"""Facts about a build that setup.py and the import check must agree on, written once.

* The fingerprint of the C++/CUDA sources: setup.py bakes it into
  ``swa_fast._C``; on import, an editable checkout recomputes it from
  ``csrc/`` and refuses a ``_C`` built from other sources (a stale build gives
  wrong answers far more quietly than a missing one).
* Whether this machine's CPU has AVX2 and FMA: setup.py compiles the CPU
  kernels for them when it does, and the import refuses such a build on a CPU
  that lacks them.

This file must not import torch or swa_fast: setup.py loads it by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Optional

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


def host_has_avx2_fma() -> Optional[bool]:
    """True or False from /proc/cpuinfo; None where it cannot be read (not Linux). Each caller
    decides what unknown means: setup.py builds the portable kernels, the import trusts the build."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return " avx2" in flags and " fma" in flags


def build_summary(info: Mapping[str, Any]) -> str:
    """One readable line for a ``BUILD_INFO`` dict (the benchmark runner's header names the build
    it measured): ``CPU kernels: avx2, CUDA kernels: none, 4096-byte kernel args, sources 0123abcd``."""
    cuda = (info["cuda_archs"] or "default archs") if info["cuda"] else "none"
    return (f"CPU kernels: {info['cpu_capability']}, CUDA kernels: {cuda}, "
            f"{info['kernel_arg_bytes']}-byte kernel args, sources {info['source_hash']}")
