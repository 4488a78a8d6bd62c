"""Build swa_fast and its one extension, ``swa_fast._C``.

Install torch first, then build without isolation so pip does not fetch a
second torch into a temporary build environment:

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

Environment switches:
  SWA_FAST_CUDA=0|1             force the CUDA kernels off / on (default: on when
                                torch has CUDA and nvcc is found).
  SWA_FAST_CPU_CAPABILITY=auto|avx2|default
                                x86 vector ISA for the CPU kernels (default auto:
                                AVX2+FMA when this machine has it, as torch's own
                                kernels do; see docs/ARCHITECTURE.md).
  SWA_FAST_KERNEL_ARG_BYTES=4096|32768
                                kernel-argument budget of the CUDA multi-tensor
                                launches (default 4096, every CUDA version; 32768
                                needs CUDA >= 12.1 and a Volta+ GPU and packs about
                                ten times as many tensors into one launch).
  TORCH_CUDA_ARCH_LIST          the GPU architectures to compile for, as for torch.

The C++ standard is torch's own (BuildExtension adds it), never forced here.

Objects go to a persistent directory, build/swa_fast-<configuration>/, so a
rebuild with unchanged sources compiles nothing (pip's editable installs would
otherwise compile everything again in a fresh temporary directory), and a
change recompiles only the files it touches: the build facts (source hash,
versions) live in a generated header that only csrc/swa_fast.cpp includes.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _build_facts():
    """swa_fast/ops/build_facts.py, loaded by path: importing swa_fast would need the extension."""
    spec = importlib.util.spec_from_file_location("_build_facts", ROOT / "swa_fast" / "ops" / "build_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda(torch, cpp_extension) -> bool:
    forced = os.environ.get("SWA_FAST_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"SWA_FAST_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
            raise SystemExit("SWA_FAST_CUDA=1 but torch has no CUDA or nvcc (CUDA_HOME) was not found")
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cpu_capability() -> str:
    choice = os.environ.get("SWA_FAST_CPU_CAPABILITY", "auto").lower()
    if choice not in ("auto", "avx2", "default"):
        raise SystemExit(f"SWA_FAST_CPU_CAPABILITY must be auto, avx2 or default, got {choice!r}")
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    if choice == "auto":
        # An unreadable /proc/cpuinfo (None) builds the portable kernels.
        choice = "avx2" if is_x86 and _build_facts().host_has_avx2_fma() else "default"
    if choice == "avx2" and not is_x86:
        raise SystemExit("SWA_FAST_CPU_CAPABILITY=avx2 needs an x86-64 machine")
    return choice


def _kernel_arg_bytes() -> int:
    choice = os.environ.get("SWA_FAST_KERNEL_ARG_BYTES", "4096")
    if choice not in ("4096", "32768"):
        raise SystemExit(f"SWA_FAST_KERNEL_ARG_BYTES must be 4096 or 32768, got {choice!r}")
    return int(choice)


def _extension():
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch, cpp_extension)
    cpu_capability = _cpu_capability()
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))
    cuda_archs = ""
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        arch_flags = cpp_extension._get_cuda_arch_flags()
        cuda_archs = ";".join(sorted({f.split("code=")[-1] for f in arch_flags if "code=" in f}))

    kernel_arg_bytes = _kernel_arg_bytes()
    tag = "-".join([
        f"py{sys.version_info.major}{sys.version_info.minor}", f"torch{torch.__version__}",
        f"cuda{cuda_archs or 'none'}", cpu_capability, f"args{kernel_arg_bytes}",
    ])
    build_dir = ROOT / "build" / ("swa_fast-" + re.sub(r"[^A-Za-z0-9.+-]", "_", tag))
    _write_build_facts_header(build_dir, {
        "SWA_FAST_SOURCE_HASH": f'"{_build_facts().source_hash(CSRC, with_cuda)}"',
        "SWA_FAST_TORCH_VERSION": f'"{torch.__version__}"',
        "SWA_FAST_CPU_CAPABILITY_NAME": f'"{cpu_capability}"',
        "SWA_FAST_CUDA_ARCHS": f'"{cuda_archs}"',
    })
    # Only what the kernels themselves depend on is a compiler flag; a flag that
    # changed would make ninja recompile every file.
    defines = [("SWA_FAST_KERNEL_ARG_BYTES", str(kernel_arg_bytes))]
    cxx = ["-O3"]
    if cpu_capability == "avx2":
        # Same ISA and vector classes torch uses for its AVX2/AVX512 kernels: the
        # fused multiply-add in lerp then rounds exactly like torch.lerp does.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    link = []
    if torch._C.has_openmp and platform.system() == "Linux":
        # at::parallel_for is header code: without -fopenmp it silently runs
        # on one thread. The loader reuses the libgomp torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    if with_cuda:
        defines.append(("SWA_FAST_WITH_CUDA", "1"))
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_class(
        name="swa_fast._C",
        sources=sources,
        include_dirs=[str(CSRC), str(build_dir)],
        define_macros=defines,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=link,
    )
    return extension, _persistent_build_ext(cpp_extension.BuildExtension, build_dir, with_cuda)


def _write_build_facts_header(build_dir: Path, facts: dict) -> None:
    """build_dir/swa_fast_build_facts.h with `facts` as macros, rewritten only when they
    changed: its timestamp is what tells ninja to recompile csrc/swa_fast.cpp."""
    text = "// Generated by setup.py: the build facts csrc/swa_fast.cpp reports. Do not edit.\n#pragma once\n"
    text += "".join(f"#define {name} {value}\n" for name, value in facts.items())
    header = build_dir / "swa_fast_build_facts.h"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)


def _persistent_build_ext(base, build_dir: Path, with_cuda: bool):
    """torch's BuildExtension, compiling into `build_dir` (kept between builds) and saying
    what it does and roughly how long it takes."""
    use_ninja = shutil.which("ninja") is not None

    class PersistentBuildExtension(base.with_options(use_ninja=use_ninja)):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = str(build_dir)

        def build_extensions(self) -> None:
            sources = len(self.extensions[0].sources)
            first = not any(build_dir.rglob("*.o"))
            estimate = ("about 1-2 minutes on 2 cores" + (", plus a few minutes for the CUDA kernels" if with_cuda else "")
                        if first else "only what changed is recompiled")
            print(f"swa_fast: building the extension from {sources} sources in {build_dir.relative_to(ROOT)} "
                  f"({estimate}){'' if use_ninja else '; ninja not found: compiling serially'}", flush=True)
            begin = time.monotonic()
            super().build_extensions()
            print(f"swa_fast: extension built in {time.monotonic() - begin:.0f} s", flush=True)

    return PersistentBuildExtension


def main() -> None:
    extension, build_ext = _extension()
    setup(
        packages=find_packages(include=["swa_fast", "swa_fast.*"]),
        ext_modules=[extension],
        cmdclass={"build_ext": build_ext},
    )


if __name__ == "__main__":
    main()
