"""README.md's performance tables are what benchmarks/readme_tables.py makes of benchmarks/results/."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import readme_tables

REPO_ROOT = Path(__file__).resolve().parent.parent

README = REPO_ROOT / "README.md"
CPU_RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu-intel-xeon-processor-2threads.json"
# A partial run (run.py --suites integrations) the README has markers for.
CPU_INTEGRATIONS = REPO_ROOT / "benchmarks" / "results" / "cpu-intel-xeon-processor-2threads-integrations.json"

CPU = {"type": "cpu", "name": "Test CPU", "threads": 4, "capability": "AVX2", "slug": "cpu-test-cpu-4threads",
       "label": "CPU Test CPU, 4 threads (copy = CPU memcpy in the same run)"}
CUDA = {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0", "slug": "nvidia-h200",
        "label": "NVIDIA H200 (CUDA 12.8)"}


def candidates(**median_ms):
    return {key: {"median_ms": ms} for key, ms in median_ms.items()}


def make_report(device, cases, torch_version="2.13.0+cpu", **extra):
    return {"schema": 2, "device": device, "torch_version": torch_version, "git_commit": "0123456789abcdef-dirty",
            "date": "2026-01-02T03:04:05+00:00", "cases": cases, **extra}


def cpu_report():
    resnet = {"num_tensors": 161, "num_params": 25_557_032}
    return make_report(CPU, {
        "resnet50": {"suite": "averaging", **resnet, "model_dtype": "float32", "avg_dtype": "float32",
                     "candidates": candidates(torch_swa=80.0, swa_fast_swa=10.0, torch_ema=12.0, swa_fast_ema=11.5,
                                              torch_foreach_lerp=11.04, swa_fast_average_=10.96, copy=12.0)},
        "resnet50_bf16": {"suite": "averaging", **resnet, "model_dtype": "bfloat16", "avg_dtype": "float32",
                          "candidates": candidates(torch_swa=40.0, torch_ema=12.5, torch_foreach_lerp=11.0,
                                                   torch_foreach_lerp_cast=27.04, swa_fast_swa=12.7, swa_fast_ema=12.6,
                                                   swa_fast_average_=12.2, copy=11.8)},
        "gbn": {"suite": "ghost_bn", "shape": [256, 64, 32, 32], "ghost_batch_size": 32, "dtype": "float32",
                "memory_format": "contiguous",
                "candidates": candidates(batchnorm=50.0, chunk_loop=60.0, reshape_trick=120.0, swa_fast=30.0, copy=7.4)},
        "distance_bf16": {"suite": "distance", **resnet, "model_dtype": "bfloat16", "ref_dtype": "float32",
                          "candidates": candidates(torch_foreach=34.0, torch_loop=30.0, swa_fast_distance=10.0, copy=11.2)},
        "multi_k3": {"suite": "multi", **resnet, "k": 3, "model_dtype": "float32", "avg_dtype": "float32",
                     "byte_ratio": 36 / 28,
                     "candidates": candidates(torch_emas=34.0, weight_averages=30.0, multi_average=22.0, copy=9.0)},
        "posthoc": {"suite": "posthoc", **resnet, "model_dtype": "float32", "avg_dtype": "float32",
                    "candidates": candidates(ema_pytorch_posthoc=20.0, swa_fast_power_ema=15.0, copy=9.5)},
        "swag": {"suite": "swag", **resnet, "model_dtype": "float32", "avg_dtype": "float32", "max_rank": 20,
                 "candidates": candidates(reference_swag=500.0, torch_foreach_swag=60.0, swa_fast_swag=20.0, copy=9.5)},
    }, loadavg_start=[0.5, 1.0, 1.0], loadavg_end=[1.75, 1.0, 1.0])


def cuda_report():
    return make_report(CUDA, {
        "billion": {"suite": "averaging", "num_tensors": 580, "num_params": 1_010_159_360, "model_dtype": "float32",
                    "avg_dtype": "float32",
                    "candidates": candidates(torch_swa=9.5, swa_fast_swa=2.5, torch_ema=3.1, swa_fast_ema=2.5,
                                             torch_foreach_lerp=2.8, swa_fast_average_=2.4, copy=0.85)},
        "gbn_bf16_cl": {"suite": "ghost_bn", "shape": [2048, 64, 32, 32], "ghost_batch_size": 128, "dtype": "bfloat16",
                        "memory_format": "channels_last",  # the reshape trick did not run
                        "candidates": candidates(batchnorm=1.2, chunk_loop=1.0, swa_fast=1.25, copy=0.2)},
        "tiny": {"suite": "distance", "num_tensors": 3, "num_params": 1500, "model_dtype": "float32",
                 "ref_dtype": "float32", "candidates": candidates(torch_foreach=0.123, swa_fast_distance=0.041, copy=0.05)},
    }, torch_version="2.13.0+cu128")


CPU_LINE = ("Measured on CPU Test CPU (AVX2), 4 threads; torch 2.13.0+cpu; commit 0123456789-dirty, 2026-01-02; "
            "load average 0.5 at the start, 1.75 at the end (`benchmarks/results/cpu.json`).")
CUDA_LINE = ("Measured on NVIDIA H200 (CUDA 12.8); torch 2.13.0+cu128; commit 0123456789-dirty, 2026-01-02 "
             "(`benchmarks/results/gpu.json`).")


def test_readme_agrees_with_the_committed_results():
    done = subprocess.run([sys.executable, "benchmarks/readme_tables.py", "--check"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # multi, posthoc, swag, averaging, ghost_bn and distance of the CPU run, and its integrations run
    assert "7 tables agree" in done.stdout


def test_formatter_on_a_cpu_report():
    report = cpu_report()
    assert readme_tables.format_block(report, "averaging", "cpu.json") == "\n".join([
        "| parameter set | torch SWA (default) | swa_fast SWA | speedup | torch EMA (`get_ema_multi_avg_fn`) "
        "| swa_fast EMA | speedup | `_foreach_lerp_` | `swa_fast.average_` | memcpy of the set |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| ResNet-50 (161 tensors, 25.6M fp32) | 80.0 | 10.0 | 8.0x | 12.0 | 11.5 | 1.04x | 11.0 | 11.0 | 12.0 |",
        "| ResNet-50, bf16 model, fp32 averages | — | 12.7 | | — | 12.6 | | 27.0 (`lerp_` after `.float()`) "
        "| 12.2 | 11.8 |",
        "",
        CPU_LINE,
    ])
    assert readme_tables.format_block(report, "ghost_bn", "cpu.json").splitlines()[2:] == [
        "| (256, 64, 32, 32), 32 | 50.0 | 60.0 | 120.0 | 30.0 | 2.0x faster | 0.60x the time |", "", CPU_LINE]
    assert readme_tables.format_block(report, "distance", "cpu.json").splitlines()[2:] == [
        "| ResNet-50, bf16 model vs fp32 snapshot | 34.0 | 30.0 | 10.0 | 3.4x / 3.0x | 11.2 |", "", CPU_LINE]
    assert readme_tables.format_block(report, "multi", "cpu.json").splitlines()[2:] == [
        "| ResNet-50 (25.6M fp32), K = 3 | 34.0 | 30.0 | 22.0 | 1.36x of 1.29x (106%) | 1.55x | 9.0 |", "", CPU_LINE]
    assert readme_tables.format_block(report, "posthoc", "cpu.json").splitlines()[2:] == [
        "| ResNet-50 (25.6M fp32), two profiles | 20.0 | 15.0 | 1.33x | 9.5 |", "", CPU_LINE]
    assert readme_tables.format_block(report, "swag", "cpu.json").splitlines()[2:] == [
        "| ResNet-50 (25.6M fp32), max_rank 20 | 500.0 | 60.0 | 20.0 | 25.0x / 3.0x | 9.5 |", "", CPU_LINE]


def test_formatter_on_a_cuda_report():
    report = cuda_report()
    assert readme_tables.format_block(report, "averaging", "gpu.json").splitlines()[2:] == [
        "| 1B transformer (580 tensors, 1.01B fp32) | 9.5 | 2.5 | 3.8x | 3.1 | 2.5 | 1.24x | 2.8 | 2.4 | 0.85 |",
        "", CUDA_LINE]
    assert readme_tables.format_block(report, "ghost_bn", "gpu.json").splitlines()[2:] == [
        "| (2048, 64, 32, 32), 128, channels_last, bf16 | 1.2 | 1.0 | — | 1.2 | 1.2x slower | 1.04x the time |",
        "", CUDA_LINE]
    # A parameter set not in benchmarks/cases.py is named by its case; a missing candidate is a dash.
    assert readme_tables.format_block(report, "distance", "gpu.json").splitlines()[2:] == [
        "| tiny (3 tensors, 1.5k, fp32 vs fp32) | 0.12 | — | 0.041 | 3.0x / — | 0.05 |", "", CUDA_LINE]


def test_check_fails_on_a_changed_figure_and_write_repairs_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    original = README.read_text()
    row = "| ResNet-50 (161 tensors, 25.6M fp32) | "
    figure = original.split(row, 1)[1].split(" |", 1)[0]  # torch SWA's time in the committed table
    changed = original.replace(row + figure + " |", row + "75.0 |", 1)
    assert changed != original and figure != "75.0"
    readme.write_text(changed)
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
    out = capsys.readouterr().out
    assert f"-{row}75.0 |" in out
    assert f"+{row}{figure} |" in out
    assert readme.read_text() == changed  # --check writes nothing
    assert readme_tables.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == original


def test_a_new_device_gets_tables_after_the_others_and_partial_runs_none(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(CPU_RESULTS, results)
    shutil.copy(CPU_INTEGRATIONS, results)
    (results / "nvidia-h200.json").write_text(json.dumps(cuda_report()))
    # A partial run (run.py --suites averaging) without markers is left out.
    (results / "nvidia-h200-averaging.json").write_text(json.dumps(cuda_report()))
    (results / "old.json").write_text(json.dumps({"schema": 1, "cases": {}}))
    readme = tmp_path / "README.md"
    original = README.read_text()
    readme.write_text(original)
    args = ["--readme", str(readme), "--results", str(results)]

    assert readme_tables.main(["--check", *args]) == 1
    assert readme_tables.main(["--write", *args]) == 0
    text = readme.read_text()
    assert readme_tables.marker_keys(text) == [("multi", "cpu-intel-xeon-processor-2threads"),
                                               ("posthoc", "cpu-intel-xeon-processor-2threads"),
                                               ("swag", "cpu-intel-xeon-processor-2threads"),
                                               ("integrations", "cpu-intel-xeon-processor-2threads-integrations")] + [
        (suite, stem) for suite in ("averaging", "ghost_bn", "distance")
        for stem in ("cpu-intel-xeon-processor-2threads", "nvidia-h200")]  # the GPU report has no multi/posthoc/swag case
    cpu_end = "<!-- tables:ghost_bn:cpu-intel-xeon-processor-2threads end -->\n"
    assert cpu_end + "\n<!-- tables:ghost_bn:nvidia-h200 begin -->\n" in text
    assert "| (2048, 64, 32, 32), 128, channels_last, bf16 |" in text
    assert readme_tables.main(["--check", *args]) == 0

    # Once the GPU results are gone, so are their tables.
    (results / "nvidia-h200.json").unlink()
    assert readme_tables.main(["--write", *args]) == 0
    assert readme.read_text() == original


def test_a_suite_without_markers_is_an_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no tables here\n")
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 2
    assert "add a '<!-- tables:multi:cpu-intel-xeon-processor-2threads begin -->'" in capsys.readouterr().err


def test_smoke_runs_are_never_read(tmp_path):
    results = tmp_path / "results"
    (results / "scratch").mkdir(parents=True)
    shutil.copy(CPU_RESULTS, results)
    # run.py --quick writes its scratch file under the device slug: the full-run name.
    (results / "scratch" / "nvidia-h200.json").write_text(json.dumps(cuda_report()))
    # A quick run put among the references with --output is left out too.
    quick = make_report(dict(CUDA, slug="nvidia-b200"), cuda_report()["cases"], settings={"quick": True})
    (results / "nvidia-b200.json").write_text(json.dumps(quick))
    assert list(readme_tables.load_reports(results, ["nvidia-h200", "nvidia-b200"])) == [CPU_RESULTS.stem]
