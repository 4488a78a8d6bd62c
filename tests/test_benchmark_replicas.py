"""The replica-averaging benchmark (benchmarks/replicas.py) runs end to end on 2 gloo ranks, its
results agree with the float64 mean of the replicas, and its command line refuses bad options.

No timing is asserted (a timing is a benchmark, never a test assertion).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases as bench_cases
from benchmarks import harness, replicas

REPO_ROOT = Path(__file__).resolve().parent.parent
FP32_EPS = torch.finfo(torch.float32).eps
BF16_UNIT_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2  # 2**-8: half a unit in the last place, relative


def test_sets_are_the_other_suites_parameter_sets():
    assert replicas.SETS["resnet50"].shapes == bench_cases.get_case("resnet50").shapes
    assert replicas.SETS["resnet50_bf16"].shapes == bench_cases.get_case("resnet50").shapes
    assert replicas.SETS["transformer"].shapes == bench_cases.get_case("transformer").shapes
    assert replicas.SETS["resnet50"].num_params == bench_cases.RESNET50_PARAMS
    assert replicas.SETS["transformer"].num_params == bench_cases.TRANSFORMER_PARAMS
    assert [replicas.SETS[n].dtype for n in ("resnet50", "transformer", "resnet50_bf16")] == [
        "float32", "float32", "bfloat16"]
    assert "161 tensors, 25,557,032 parameters" in replicas.__doc__
    assert "292 tensors, 101,914,112 parameters" in replicas.__doc__
    for name in replicas.CANDIDATES:
        assert f"``{name}``" in replicas.__doc__


def test_quick_run_on_two_ranks_writes_sane_json(tmp_path, capsys):
    output = tmp_path / "replicas.json"
    report = replicas.main(["--quick", "--output", str(output), "--timeout", "240"])
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["schema"] == "replicas-1"
    assert saved["settings"]["quick"] is True and saved["settings"]["worlds"] == [2]
    assert saved["settings"]["sets"] == ["tiny", "tiny_bf16"] and saved["settings"]["bucket_mb"] == 25.0
    assert saved["machine"]["worlds"] == [2] and saved["machine"]["threads_per_rank"] == 1
    assert "2 gloo ranks" in saved["machine"]["description"]
    for key in ("device", "torch_version", "swa_fast_version", "git_commit", "date", "command", "wall_s"):
        assert key in saved
    assert list(saved["runs"]) == ["tiny-2ranks", "tiny_bf16-2ranks"]
    out = capsys.readouterr().out
    assert f"saved {output}" in out
    assert out.count("| candidate | median ms, slowest rank (IQR) |") == 2

    for key, run in saved["runs"].items():
        info = run["set"]
        spec = replicas.SETS[info["name"]]
        assert run["world"] == 2 and key == f"{info['name']}-2ranks"
        assert info["num_tensors"] == len(spec.shapes) == 28
        assert info["num_params"] == sum(math.prod(s) for s in spec.shapes)
        assert info["model_bytes"] == info["num_params"] * {"float32": 4, "bfloat16": 2}[info["dtype"]]
        assert 0 < info["reference_max_abs"] <= info["replica_max_abs"] < 1  # N(0, 0.02^2) values
        assert set(run["candidates"]) == set(replicas.CANDIDATES)
        assert len(run["setup_s_per_rank"]) == 2
        for name, candidate in run["candidates"].items():
            assert [r["rank"] for r in candidate["per_rank"]] == [0, 1], name
            for rank in candidate["per_rank"]:
                assert rank["repeats"] == 3 and len(rank["samples_ms"]) == 3 and rank["median_ms"] > 0
            slowest = candidate["slowest_rank"]
            assert slowest["repeats"] == 3 and slowest["median_ms"] >= max(r["min_ms"] for r in candidate["per_rank"])
            assert candidate["inner"] >= 1
            assert candidate["model_gbps"] == pytest.approx(info["model_bytes"] / slowest["median_ms"] / 1e6)
        collectives = {name: c["collectives_per_call"] for name, c in run["candidates"].items()}
        assert collectives == {"average_replicas_": run["average_replicas_buckets"] + 1,
                               "per_tensor_all_reduce": 28, "flatten_dense_tensors": 1, "all_reduce_coalesced": 1}
        assert set(run["speedups"]) == {f"average_replicas_ vs {k}" for k in replicas.CANDIDATES
                                        if k != "average_replicas_"}
        for speedup in run["speedups"].values():
            baseline = run["candidates"][speedup["baseline"]]["slowest_rank"]["median_ms"]
            fast = run["candidates"]["average_replicas_"]["slowest_rank"]["median_ms"]
            assert speedup["slowest_rank_median"] == pytest.approx(baseline / fast)
            assert len(speedup["per_rank_median"]) == 2

        # Accuracy against the float64 mean of the two replicas (rebuilt from the seeds on every rank).
        errors = {name: c["max_abs_error_vs_float64_mean"] for name, c in run["candidates"].items()}
        assert run["candidates"]["average_replicas_"]["bitwise_identical_on_all_ranks"] is True
        if info["dtype"] == "float32":
            # fp32 sums of 2 values, one division: a few fp32 ulps of the largest value at most.
            bound = 2 * 2 * FP32_EPS * info["replica_max_abs"]
            assert all(0 <= error <= bound for error in errors.values()), (errors, bound)
        else:
            # One rounding of the exact mean to bf16 (plus fp32 accumulation, far below it).
            bound = 1.01 * BF16_UNIT_ROUNDOFF * info["reference_max_abs"]
            assert 0 < errors["average_replicas_"] <= bound, (errors, bound)
            # On 2 ranks a bf16 sum is rounded once and halving is exact: every candidate is as close.
            assert all(error <= bound for error in errors.values()), (errors, bound)


@pytest.mark.parametrize("flags,message", [
    (["--worlds", "1"], "--worlds: every world must be >= 2"),
    (["--worlds", "0", "2"], "--worlds: every world must be >= 2"),
    (["--worlds", "2", "2"], "--worlds names a value twice"),
    (["--sets", "tiny", "tiny"], "--sets names a value twice"),
    (["--sets", "resnet18"], "invalid choice: 'resnet18'"),
    (["--candidates", "nccl"], "invalid choice: 'nccl'"),
    (["--worlds", "two"], "invalid int value: 'two'"),
    (["--bucket-mb", "0"], "--bucket-mb must be a positive number of MiB"),
    (["--bucket-mb", "nan"], "--bucket-mb must be a positive number of MiB"),
    (["--threads", "0"], "--threads, --repeats and --inner must be >= 1"),
    (["--repeats", "0"], "--threads, --repeats and --inner must be >= 1"),
    (["--inner", "0"], "--threads, --repeats and --inner must be >= 1"),
    (["--warmup", "-1"], "--warmup >= 0"),
    (["--target-ms", "0"], "--target-ms and --timeout must be > 0"),
    (["--budget", "-5"], "--budget >= 0"),
])
def test_bad_arguments_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        replicas.main(["--quick", "--no-save", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m benchmarks.replicas") and message in err, err


def test_parse_args_and_default_output():
    full = replicas.parse_args([])
    assert full.sets == ["resnet50", "transformer", "resnet50_bf16"] and full.worlds == [2, 4]
    assert full.threads == 1 and full.bucket_mb == 25.0 and full.repeats >= harness.MIN_REPEATS
    assert replicas.default_output(full, "slug") == harness.RESULTS_DIR / "slug-replicas.json"
    reordered = replicas.parse_args(["--sets", "transformer", "resnet50_bf16", "resnet50", "--worlds", "4", "2"])
    assert replicas.default_output(reordered, "slug") == harness.RESULTS_DIR / "slug-replicas.json"
    some = replicas.parse_args(["--sets", "resnet50", "transformer", "--worlds", "4"])
    expected = harness.RESULTS_DIR / "slug-replicas-resnet50-transformer-4ranks.json"
    assert replicas.default_output(some, "slug") == expected
    quick = replicas.parse_args(["--quick"])
    assert quick.sets == ["tiny", "tiny_bf16"] and quick.worlds == [2] and quick.repeats < harness.MIN_REPEATS
    assert replicas.default_output(quick, "slug") == harness.SCRATCH_DIR / "slug-replicas-tiny-tiny_bf16-2ranks.json"
    few = replicas.parse_args(["--repeats", str(harness.MIN_REPEATS - 1)])
    assert replicas.default_output(few, "slug") == harness.SCRATCH_DIR / "slug-replicas.json"


def test_runs_as_a_script():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "replicas.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO_ROOT / "tests", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--worlds" in done.stdout and "--sets" in done.stdout
