"""The op bindings: loads ``swa_fast._C`` and imports every op module, in one place.

The lowest Python layer: it imports nothing else of swa_fast. Importing it is what
makes ``torch.ops.swa_fast.*`` exist, with their fake kernels, autograd formulas and
Python wrappers (one module per op: ``average``, ``ghost_bn``, ``distance``;
``launch_plan`` exposes the CUDA harness's planning; ``build_facts`` is what setup.py
and the loader both need to know about a build). It fails with an ImportError that says how to
build when the extension is missing, was built for another torch, or was built
from other sources than this checkout. Nothing but these modules touches ``_C``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from swa_fast.ops.build_facts import host_has_avx2_fma, source_hash

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_BUILD_HELP = (
    "Build it from the swa_fast source checkout, after installing torch "
    f"(e.g. `pip install torch==2.13.0`):\n    {BUILD_COMMAND}\n"
    "(--no-build-isolation makes the build use the torch you have instead of downloading another)."
)


def _load_extension():
    try:
        from swa_fast import _C
    except ImportError as error:
        raise ImportError(
            f"swa_fast's compiled extension swa_fast._C could not be loaded ({error}).\n{_BUILD_HELP}"
        ) from error
    info = _C.build_info()
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"swa_fast._C was built for torch {info['torch_version']} but torch {torch.__version__} is "
            f"installed; rebuild it.\n{_BUILD_HELP}"
        )
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if csrc.is_dir() and os.environ.get("SWA_FAST_SKIP_SOURCE_CHECK") != "1":
        current = source_hash(csrc, with_cuda=info["cuda"])
        if current != info["source_hash"]:
            raise ImportError(
                f"swa_fast._C is stale: it was built from sources {info['source_hash']} but {csrc} is now "
                f"{current}.\n{_BUILD_HELP}\n(Set SWA_FAST_SKIP_SOURCE_CHECK=1 to load the stale build anyway.)"
            )
    # An unknown CPU (no /proc/cpuinfo) is trusted to be the one the build was made for.
    if info["cpu_capability"] == "avx2" and host_has_avx2_fma() is False:
        raise ImportError(
            "swa_fast._C was compiled for AVX2+FMA, which this CPU lacks. Rebuild with "
            f"SWA_FAST_CPU_CAPABILITY=default {BUILD_COMMAND}"
        )
    return _C


_C = _load_extension()
BUILD_INFO: dict = dict(_C.build_info())

# Every op module, once _C exists (they import it from here).
from swa_fast.ops import average, distance, ghost_bn, launch_plan  # noqa: E402,F401
