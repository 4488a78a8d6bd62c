"""Compile-check every CUDA source with nvcc on a machine without a GPU.

CUDA kernels cannot run here, but they must still compile: each
``csrc/cuda/*.cu`` is compiled (not linked) with the flags torch's
BuildExtension uses, against this torch's headers. The CPU wheel lacks one
generated CUDA config header, ``c10/cuda/impl/cuda_cmake_macros.h``; a
one-line stand-in is written to a temporary include directory.

On a GPU machine the real build (``pip install --no-build-isolation -e .``)
and ``pytest -m cuda`` cover these files instead, so this test skips there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
COMPILE_TIMEOUT_S = 600


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


def _nvcc_command(source: Path, output: Path, generated_include_dir: Path) -> list[str]:
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    includes = [*cpp_extension.include_paths(), str(CSRC), str(generated_include_dir)]
    return [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(output),
        "-std=c++17",
        "-O0",
        "--expt-relaxed-constexpr",
        "-DSWA_FAST_WITH_CUDA",
        # The flags torch's BuildExtension passes to nvcc: c10::Half/BFloat16
        # must not rely on CUDA's implicit half conversions.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in includes),
        "-gencode",
        "arch=compute_90,code=sm_90",
    ]


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(source: Path, tmp_path: Path, generated_include_dir: Path) -> None:
    command = _nvcc_command(source, tmp_path / f"{source.stem}.o", generated_include_dir)
    start = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nvcc did not finish compiling {source.name} within {COMPILE_TIMEOUT_S} s")
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        pytest.fail(
            f"nvcc failed to compile {source.relative_to(ROOT)} (exit {result.returncode}, {elapsed:.0f} s).\n"
            f"command: {' '.join(command)}\n"
            f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}",
            pytrace=False,
        )
