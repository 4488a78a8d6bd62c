"""The build facts, `python -m swa_fast info`, and the import errors that say how to build."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import swa_fast
from swa_fast import ops as _ops
from swa_fast.__main__ import info_lines, main

ROOT = Path(__file__).resolve().parent.parent


def test_build_info_describes_this_build():
    info = swa_fast.BUILD_INFO
    assert info["torch_version"] == torch.__version__
    assert info["cpu_capability"] in ("avx2", "default")
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_info_command_prints_versions_kernels_and_gpu():
    result = subprocess.run([sys.executable, "-m", "swa_fast", "info"], capture_output=True, text=True, check=True)
    out = result.stdout
    assert f"swa_fast {swa_fast.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "CPU kernels: compiled" in out
    assert "CUDA kernels:" in out
    assert ("GPU 0:" in out) == torch.cuda.is_available()
    assert out.splitlines() == info_lines()


def cli_help(capsys, *args: str) -> str:
    """What ``python -m swa_fast ARGS --help`` prints (argparse exits 0 after printing it)."""
    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_plain_text():
    result = subprocess.run([sys.executable, "-m", "swa_fast", "--help"], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert "``" not in result.stdout
    for command in ("info", "bench", "average"):
        assert command in result.stdout


@pytest.mark.parametrize("command", [[], ["info"], ["average"], ["bench"]])
def test_help_texts_have_no_markup(capsys, command):
    text = cli_help(capsys, *command)
    # reST double backticks, Markdown code spans, bold: what a docstring or README would carry over.
    for artefact in ("``", "`", "**", ":func:", ":class:"):
        assert artefact not in text, (command, artefact)


def test_bench_help_lists_the_runners_options():
    result = subprocess.run([sys.executable, "-m", "swa_fast", "bench", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m swa_fast bench")
    for option in ("--suites", "--device", "--cases", "--quick", "--output"):
        assert option in result.stdout, option


def run_import(prelude: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(prelude) + "\nimport swa_fast\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_missing_extension_says_how_to_build():
    result = run_import("import sys\nsys.modules['swa_fast._C'] = None\n")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "swa_fast._C could not be loaded" in result.stderr
    assert _ops.BUILD_COMMAND in result.stderr


def test_stale_extension_says_how_to_rebuild(monkeypatch):
    monkeypatch.delenv("SWA_FAST_SKIP_SOURCE_CHECK", raising=False)
    monkeypatch.setattr(_ops, "source_hash", lambda csrc, with_cuda: "0000000000000000")
    with pytest.raises(ImportError, match="swa_fast._C is stale") as error:
        _ops._load_extension()
    assert _ops.BUILD_COMMAND in str(error.value)


def test_extension_for_another_torch_is_refused(monkeypatch):
    real = _ops._C.build_info

    class FakeC:
        @staticmethod
        def build_info():
            return {**real(), "torch_version": "1.0.0"}

    monkeypatch.setitem(sys.modules, "swa_fast._C", FakeC)
    monkeypatch.setattr(swa_fast, "_C", FakeC, raising=False)
    with pytest.raises(ImportError, match=r"built for torch 1.0.0"):
        _ops._load_extension()


def load_setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("swa_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def test_build_leaves_the_cxx_standard_to_torch(monkeypatch):
    monkeypatch.delenv("SWA_FAST_KERNEL_ARG_BYTES", raising=False)
    extension, _ = load_setup_module()._extension()
    flags = extension.extra_compile_args
    for compiler in ("cxx", "nvcc"):
        assert not any(flag.startswith("-std") for flag in flags.get(compiler, [])), flags
    assert ("SWA_FAST_KERNEL_ARG_BYTES", "4096") in extension.define_macros


@pytest.mark.parametrize("value,ok", [("32768", True), ("4096", True), ("8192", False), ("big", False)])
def test_kernel_arg_budget_switch(monkeypatch, value, ok):
    monkeypatch.setenv("SWA_FAST_KERNEL_ARG_BYTES", value)
    setup = load_setup_module()
    if ok:
        assert setup._kernel_arg_bytes() == int(value)
    else:
        with pytest.raises(SystemExit, match="must be 4096 or 32768"):
            setup._kernel_arg_bytes()


def test_rebuilds_are_incremental(monkeypatch):
    # Objects go to a persistent build directory (pip's editable installs would use a fresh
    # temporary one every time), and the per-build facts are a generated header, not compiler
    # flags: a flag that changes with every source edit would make ninja recompile every file.
    monkeypatch.delenv("SWA_FAST_KERNEL_ARG_BYTES", raising=False)
    from setuptools import Distribution

    setup = load_setup_module()
    extension, build_ext = setup._extension()
    assert [name for name, _ in extension.define_macros] == ["SWA_FAST_KERNEL_ARG_BYTES"]
    (build_dir,) = [Path(d) for d in extension.include_dirs if Path(d).parent == ROOT / "build"]
    facts = (build_dir / "swa_fast_build_facts.h").read_text()
    assert f'#define SWA_FAST_SOURCE_HASH "{swa_fast.BUILD_INFO["source_hash"]}"' in facts
    command = build_ext(Distribution({"name": "swa_fast", "ext_modules": [extension]}))
    command.initialize_options()
    command.finalize_options()
    assert command.build_temp == str(build_dir)
