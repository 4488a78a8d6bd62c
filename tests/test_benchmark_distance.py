"""The distance benchmark suite: its parameter sets, its candidates, and a quick runner smoke run.

No timing is asserted (a timing is a benchmark, never a test assertion).
"""

from pathlib import Path

import pytest
import torch

from benchmarks import cases as bench_cases
from benchmarks import distance as bench_distance
from benchmarks import run as bench_run

REPO_ROOT = Path(__file__).resolve().parent.parent

CANDIDATES = {"torch_foreach", "torch_loop", "swa_fast_distance", "copy"}


def test_cases_are_the_averaging_parameter_sets():
    resnet = bench_distance.CASES["distance_resnet50"]
    transformer = bench_distance.CASES["distance_transformer"]
    mixed = bench_distance.CASES["distance_resnet50_bf16_vs_fp32"]
    assert (resnet.num_tensors, resnet.num_params) == (bench_cases.RESNET50_TENSORS, bench_cases.RESNET50_PARAMS)
    assert (transformer.num_tensors, transformer.num_params) == (
        bench_cases.TRANSFORMER_TENSORS,
        bench_cases.TRANSFORMER_PARAMS,
    )
    assert mixed.shapes == resnet.shapes
    assert (mixed.dtype, mixed.ref_dtype) == (torch.bfloat16, torch.float32)
    assert resnet.read_bytes == 8 * resnet.num_params and mixed.read_bytes == 6 * mixed.num_params
    billion = bench_distance.CASES["distance_billion"]
    assert billion.gpu_only and not billion.applies_to("cpu") and billion.num_params == bench_cases.BILLION_PARAMS
    assert [n for n, c in bench_distance.CASES.items() if c.applies_to("cpu")] == [
        "distance_resnet50", "distance_transformer", "distance_resnet50_bf16_vs_fp32"]


def test_case_names_are_unique_across_suites():
    known = bench_run.all_cases()  # raises on a clash
    assert {name for name, (suite, _) in known.items() if suite == "distance"} == set(bench_distance.CASES)
    assert "distance" in bench_run.SUITES and "``distance``" in bench_run.__doc__


def test_candidates_compute_the_same_distances():
    case = bench_distance.DistanceCase("tiny", ((16, 3, 3, 3), (16,), (10, 16), (10,)), torch.bfloat16, torch.float32)
    candidates = {c.key: c for c in bench_distance.build_candidates(case, "cpu")}
    assert set(candidates) == CANDIDATES
    for key in CANDIDATES:
        candidates[key].fn()  # every candidate runs
        assert candidates[key].bytes_per_update == case.read_bytes  # the copy moves as many bytes as the op reads
    assert {c.kind for c in candidates.values()} == {"torch", "swa_fast", "copy"}
    info = bench_distance.describe(case)
    assert info["read_bytes"] == case.read_bytes and info["ref_dtype"] == "float32"
    header = bench_distance.header_lines(case, "CPU test")
    assert header[0].startswith("== tiny") and "bfloat16" in header[1] and "CPU test" in header[1]


def test_baselines_agree_with_the_op():
    from swa_fast.distance import distance_norms

    case = bench_distance.DistanceCase("tiny", ((7, 5), (5,), (300,)))
    a = [p.detach() for p in bench_cases.make_model(case, "cpu").parameters()]
    b = [x + 0.5 for x in a]
    per_foreach = torch.stack(torch._foreach_norm(torch._foreach_sub(a, b)))
    per_loop = torch.stack([(x - y).norm() for x, y in zip(a, b)])
    per_fused, total = distance_norms(a, b)
    assert torch.allclose(per_fused, per_foreach, rtol=1e-6) and torch.allclose(per_fused, per_loop, rtol=1e-6)
    assert total.item() == pytest.approx(torch.linalg.vector_norm(per_loop).item(), rel=1e-6)


def test_runner_quick_distance_suite(capsys):
    report = bench_run.main(["--device", "cpu", "--quick", "--no-save", "--suites", "distance",
                             "--repeats", "2", "--warmup", "0", "--inner", "1"])
    assert set(report["cases"]) == {"distance_resnet50", "distance_transformer", "distance_resnet50_bf16_vs_fp32"}
    for name, result in report["cases"].items():
        assert result["suite"] == "distance"
        assert set(result["candidates"]) == CANDIDATES
        for candidate in result["candidates"].values():
            assert candidate["repeats"] == 2 and candidate["median_ms"] > 0 and candidate["gbps"] > 0
        assert set(result["speedups"]) == {name for name, _, _ in bench_distance.SPEEDUPS}
    resnet = report["cases"]["distance_resnet50"]
    assert (resnet["num_tensors"], resnet["num_params"]) == (161, 25_557_032)
    out = capsys.readouterr().out
    assert "== distance_transformer" in out and "speedup distance vs per-tensor loop" in out
