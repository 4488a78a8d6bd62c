"""The benchmark parameter sets have the documented shapes, and the runner works end to end.

No timing is asserted (a timing is a benchmark, never a test assertion).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swa_fast
from swa_fast.ops.build_facts import build_summary

from benchmarks import averaging, harness
from benchmarks import cases as bench_cases
from benchmarks import run as bench_run

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_resnet50_is_torchvisions_parameter_set():
    shapes = bench_cases.resnet50_shapes()
    assert len(shapes) == 161 == bench_cases.RESNET50_TENSORS
    assert sum(math.prod(s) for s in shapes) == 25_557_032 == bench_cases.RESNET50_PARAMS
    assert shapes[0] == (64, 3, 7, 7)
    assert shapes[-2:] == [(1000, 2048), (1000,)]
    assert sum(len(s) == 4 for s in shapes) == 53  # 1 stem + 16 blocks x 3 + 4 downsample convs
    case = bench_cases.get_case("resnet50")
    assert (case.num_tensors, case.num_params) == (161, 25_557_032)


def test_transformer_counts_match_the_docstring():
    case = bench_cases.get_case("transformer")
    assert case.num_tensors == bench_cases.TRANSFORMER_TENSORS == 292
    assert case.num_params == bench_cases.TRANSFORMER_PARAMS == 101_914_112
    assert "292 tensors, 101,914,112 parameters" in bench_cases.__doc__


def test_billion_counts_match_the_docstring():
    for name in ("billion", "billion_bf16"):
        case = bench_cases.get_case(name)
        assert case.gpu_only and not case.applies_to("cpu")
        assert (case.num_tensors, case.num_params) == (580, 1_010_159_360)
    assert "580 tensors, 1,010,159,360 parameters" in bench_cases.__doc__
    assert [c.name for c in bench_cases.cases_for("cpu")] == ["resnet50", "transformer", "resnet50_bf16"]


def test_bf16_case_keeps_fp32_averages():
    case = bench_cases.get_case("resnet50_bf16")
    assert case.dtype == torch.bfloat16 and case.averaged_dtype == torch.float32
    assert case.shapes == bench_cases.get_case("resnet50").shapes
    assert case.averaged_bytes == 2 * case.model_bytes


def test_make_model_has_exactly_the_case_shapes():
    case = bench_cases.Case("small", ((3, 4), (5,), (2, 1, 3, 3)), torch.bfloat16)
    model = bench_cases.make_model(case, "cpu")
    params = list(model.parameters())
    assert [tuple(p.shape) for p in params] == list(case.shapes)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in params)
    again = bench_cases.make_model(case, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters()))  # deterministic


def test_runner_quick_resnet50_end_to_end(capsys):
    report = bench_run.main(["--device", "cpu", "--quick", "--cases", "resnet50", "--no-save", "--repeats", "2"])
    result = report["cases"]["resnet50"]
    assert (result["num_tensors"], result["num_params"]) == (161, 25_557_032)
    expected = {"torch_swa", "torch_ema", "torch_foreach_lerp", "swa_fast_swa", "swa_fast_ema",
                "swa_fast_average_", "copy"}
    assert set(result["candidates"]) == expected
    for candidate in result["candidates"].values():
        assert candidate["repeats"] == 2 and candidate["median_ms"] > 0 and candidate["gbps"] > 0
    assert set(result["speedups"]) == {"swa_fast SWA vs torch SWA", "swa_fast EMA vs torch EMA",
                                       "average_ vs _foreach_lerp_"}
    out = capsys.readouterr().out
    assert "== resnet50" in out and "speedup swa_fast SWA vs torch SWA" in out


def test_runner_saves_json(tmp_path, monkeypatch):
    tiny = bench_cases.Case("tiny", ((64, 3, 3, 3), (64,), (10, 64), (10,)), torch.bfloat16, torch.float32)
    monkeypatch.setitem(bench_cases.CASES, "tiny", tiny)
    output = tmp_path / "results.json"
    bench_run.main(["--device", "cpu", "--cases", "tiny", "--repeats", "2", "--warmup", "1",
                    "--output", str(output)])
    saved = json.loads(output.read_text())
    for key in ("device", "torch_version", "swa_fast_version", "swa_fast_build_info", "git_commit", "date",
                "command", "settings"):
        assert key in saved
    assert saved["device"]["type"] == "cpu" and saved["device"]["threads"] >= 1
    result = saved["cases"]["tiny"]
    assert "torch_foreach_lerp_cast" in result["candidates"]
    assert "average_ vs _foreach_lerp_(avg32, [x.to(float32)])" in result["speedups"]
    fast = result["candidates"]["swa_fast_swa"]
    assert fast["bytes_per_update"] == 2 * tiny.averaged_bytes + tiny.model_bytes
    assert set(fast) >= {"median_ms", "min_ms", "repeats", "gbps", "fraction_of_copy"}


def test_gpu_only_case_is_skipped_on_cpu(capsys):
    report = bench_run.main(["--device", "cpu", "--cases", "billion", "--no-save"])
    assert report["cases"] == {}
    assert "skipping billion" in capsys.readouterr().out


def test_runner_runs_as_a_script():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO_ROOT / "tests", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--cases" in done.stdout


@pytest.mark.parametrize("device", ["cpu"])
def test_parse_args_defaults(device):
    args = bench_run.parse_args(["--device", device])
    assert args.repeats >= 5 and args.warmup >= 1 and not args.no_save
    quick = bench_run.parse_args(["--device", device, "--quick"])
    assert quick.repeats <= 3


TINY = bench_cases.Case("tiny", ((64, 3, 3, 3), (64,), (10, 64), (10,)), torch.float32)


def results_listing():
    """Every entry of benchmarks/results/ with its mtime and size: what a run must leave alone."""
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in harness.RESULTS_DIR.iterdir()}


def test_quick_run_writes_to_scratch_and_leaves_results_alone(tmp_path, monkeypatch, capsys):
    # One tiny suite, so that a run without --suites/--cases is a "full" run: its default name is the
    # device slug, the name of the committed reference of this machine's kind.
    monkeypatch.setattr(averaging, "CASES", {"tiny": TINY})
    monkeypatch.setattr(bench_run, "SUITES", {"averaging": averaging})
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(harness, "SCRATCH_DIR", scratch)  # where results_folder sends a smoke run
    before = results_listing()
    report = bench_run.main(["--device", "cpu", "--quick", "--repeats", "2"])
    assert results_listing() == before
    written = scratch / f"{report['device']['slug']}.json"
    assert [p.name for p in scratch.iterdir()] == [written.name]
    assert json.loads(written.read_text())["settings"]["quick"] is True
    saved = capsys.readouterr().out.splitlines()[-1]
    assert saved.startswith(f"saved {written}") and "smoke run" in saved and "--output" in saved


def test_scratch_is_git_ignored_and_inside_results():
    assert harness.SCRATCH_DIR.parent == harness.RESULTS_DIR
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "/" + harness.SCRATCH_DIR.relative_to(REPO_ROOT).as_posix() + "/" in ignored


@pytest.mark.parametrize("flags,folder,name", [
    ([], "results", "slug.json"),
    (["--repeats", "15"], "results", "slug.json"),  # fewer repeats than the default, still a measurement
    (["--cases", "resnet50"], "results", "slug-resnet50.json"),
    (["--quick"], "scratch", "slug.json"),
    (["--repeats", str(harness.MIN_REPEATS - 1)], "scratch", "slug.json"),
    (["--quick", "--suites", "distance"], "scratch", "slug-distance.json"),
])
def test_default_output(flags, folder, name):
    args = bench_run.parse_args(["--device", "cpu", *flags])
    expected = {"results": harness.RESULTS_DIR, "scratch": harness.SCRATCH_DIR}[folder] / name
    assert bench_run.default_output("slug", args) == expected


def test_runner_first_line_names_the_build(monkeypatch, capsys):
    monkeypatch.setitem(bench_cases.CASES, "tiny", TINY)
    bench_run.main(["--device", "cpu", "--cases", "tiny", "--quick", "--repeats", "1", "--no-save"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "{" not in first
    assert first.startswith(f"swa_fast {swa_fast.__version__} ({build_summary(swa_fast.BUILD_INFO)}), torch ")
    info = swa_fast.BUILD_INFO
    for fact in (f"CPU kernels: {info['cpu_capability']}", f"{info['kernel_arg_bytes']}-byte kernel args",
                 info["source_hash"], torch.__version__):
        assert fact in first


def test_command_recorded_names_the_front_end():
    assert bench_run.command_line(["--quick"], "python -m swa_fast bench") == "python -m swa_fast bench --quick"
    assert bench_run.command_line(["--quick"], None) == "benchmarks.run.main(['--quick'])"


def test_multi_suite_candidates_on_a_tiny_set():
    """The several-averages suite's candidates run, and count the bytes its docstring says."""
    from benchmarks import multi

    case = multi.MultiCase("tiny", ((3, 4), (5,)), k=3)
    found = {c.key: c for c in multi.build_candidates(case, "cpu")}
    assert list(found) == ["torch_emas", "weight_averages", "multi_average", "copy"]
    for candidate in found.values():
        candidate.fn()
    params = 17 * 4  # fp32 bytes
    assert found["weight_averages"].bytes_per_update == found["torch_emas"].bytes_per_update == 12 * 3 * 17
    assert found["multi_average"].bytes_per_update == params + 2 * 3 * params
    assert [round(multi.byte_ratio(k), 3) for k in (1, 2, 3, 4)] == [1.0, 1.2, 1.286, 1.333]
    assert set(multi.CASES) == {f"multi_{s}_k{k}" for s in ("resnet50", "transformer") for k in (1, 2, 3, 4)}


def test_posthoc_suite_candidates_on_a_tiny_set():
    """The post-hoc EMA suite's candidates run (ema-pytorch's too: a development dependency)."""
    from benchmarks import posthoc

    case = posthoc.PosthocCase("tiny", ((3, 4), (5,)))
    found = {c.key: c for c in posthoc.build_candidates(case, "cpu")}
    assert list(found) == ["swa_fast_power_ema", "ema_pytorch_posthoc", "copy"]
    for candidate in found.values():
        candidate.fn()
    assert found["swa_fast_power_ema"].bytes_per_update == 17 * 4 * 5
    assert found["ema_pytorch_posthoc"].bytes_per_update == 17 * 4 * 6


@pytest.mark.parametrize("package, keys", [
    ("timm", ["swa_fast_timm", "timm"]),
    ("timm_bf16", ["swa_fast_timm_bf16", "timm_bf16", "average_stochastic_bf16", "average_fp32"]),
    ("diffusers", ["swa_fast_diffusers", "diffusers", "diffusers_foreach"]),
    ("lightning", ["swa_fast_lightning", "lightning"]),
])
def test_integrations_suite_candidates_on_a_tiny_set(package, keys):
    """Each package's own class and swa_fast's drop-in run side by side (the packages are
    development dependencies), and count the bytes of an EMA step."""
    from benchmarks import integrations

    avg_dtype = torch.bfloat16 if package == "timm_bf16" else None
    case = integrations.IntegrationCase("tiny", ((3, 4), (5,)), avg_dtype=avg_dtype, package=package)
    found = {c.key: c for c in integrations.build_candidates(case, "cpu")}
    assert list(found) == keys + ["copy"]
    for candidate in found.values():
        candidate.fn()
    averaged = 2 if package == "timm_bf16" else 4
    assert all(found[key].bytes_per_update == 17 * (4 + 2 * (4 if key == "average_fp32" else averaged))
               for key in keys)
    assert {c.package for c in integrations.CASES.values()} == {"timm", "timm_bf16", "diffusers", "lightning"}
