"""Compile-check every CUDA source with nvcc on a machine without a GPU.

CUDA kernels cannot run here, but they must still compile: each
``csrc/cuda/*.cu`` is compiled (not linked) with the flags torch's
BuildExtension uses, against this torch's headers. The CPU wheel lacks one
generated CUDA config header, ``c10/cuda/impl/cuda_cmake_macros.h``; a
one-line stand-in is written to a temporary include directory.

All sources compile at once, in parallel (one nvcc per core), to PTX (not
machine code: see _nvcc_command), and each test reports one file's result. The files that include the multi-tensor harness
are compiled a second time with the 32 KB kernel-argument budget
(SWA_FAST_KERNEL_ARG_BYTES=32768), the other build-time choice.

On a GPU machine the real build (``pip install --no-build-isolation -e .``)
and ``pytest -m cuda`` cover these files instead, so this test skips there.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
COMPILE_TIMEOUT_S = 600
# (test id, source, extra macros, host too): every source as built by default,
# host and device code; plus the harness users with the large kernel-argument
# budget, device code only (what the budget changes is the kernels' argument
# structs, and their size is checked there), which halves their cost.
VARIANTS = [(p.name, p, {}, True) for p in CUDA_SOURCES] + [
    (f"{p.name}[32KB args]", p, {"SWA_FAST_KERNEL_ARG_BYTES": "32768"}, False)
    for p in CUDA_SOURCES
    if '#include "cuda/multi_tensor_apply.cuh"' in p.read_text()
]


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() and os.access(default, os.X_OK) else None


NVCC = _find_nvcc()

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (neither on PATH nor at /usr/local/cuda/bin/nvcc)"),
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="a GPU is available: the real CUDA build and `pytest -m cuda` check these sources there",
    ),
]


@pytest.fixture(scope="module")
def generated_include_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_config")
    header = root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return root


def _torch_cxx_standard() -> str:
    """The -std flag torch's BuildExtension adds (setup.py never sets one)."""
    return "-std=c++20" if "'c++20'" in inspect.getsource(cpp_extension) else "-std=c++17"


def _nvcc_command(source: Path, output: Path, generated_include_dir: Path, macros: dict, host: bool) -> list[str]:
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    includes = [*cpp_extension.include_paths(), str(CSRC), str(generated_include_dir)]
    return [
        NVCC,
        "-c" if host else "-ptx",
        str(source),
        "-o",
        str(output),
        _torch_cxx_standard(),
        "-O0",
        "--expt-relaxed-constexpr",
        "-DSWA_FAST_WITH_CUDA",
        *(f"-D{name}={value}" for name, value in macros.items()),
        # The flags torch's BuildExtension passes to nvcc: c10::Half/BFloat16
        # must not rely on CUDA's implicit half conversions.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in includes),
        # PTX only: the front end and NVVM check everything a build checks (types,
        # templates, kernel-argument sizes: "Formal parameter space overflowed" is
        # theirs); ptxas, which only turns PTX into machine code, is skipped, which
        # is most of the time of the template-heavy files.
        "-gencode",
        "arch=compute_90,code=compute_90",
    ]


def _compile(command: list[str]) -> tuple[subprocess.CompletedProcess | None, float]:
    start = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        result = None
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, generated_include_dir) -> dict:
    """Every variant compiled once, all at the same time: test id -> (command, result, seconds)."""
    out = tmp_path_factory.mktemp("cuda_objects")
    commands = {
        name: _nvcc_command(source, out / f"{i}_{source.stem}.o", generated_include_dir, macros, host)
        for i, (name, source, macros, host) in enumerate(VARIANTS)
    }
    # Longest first (by source size, with its .cuh parts), so the slowest file never starts last.
    cost = {name: sum(f.stat().st_size for f in [source, *source.parent.glob(source.stem.split("_cuda")[0] + "*.cuh")])
            for name, source, _, _ in VARIANTS}
    order = sorted(commands, key=lambda name: -cost[name])
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = dict(zip(order, pool.map(_compile, [commands[name] for name in order])))
    return {name: (commands[name], *results[name]) for name in commands}


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_cuda_source_compiles(name: str, compiled: dict) -> None:
    command, result, elapsed = compiled[name]
    if result is None:
        pytest.fail(f"nvcc did not finish compiling {name} within {COMPILE_TIMEOUT_S} s")
    if result.returncode != 0:
        pytest.fail(
            f"nvcc failed to compile {name} (exit {result.returncode}, {elapsed:.0f} s).\n"
            f"command: {' '.join(command)}\n"
            f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}",
            pytrace=False,
        )
