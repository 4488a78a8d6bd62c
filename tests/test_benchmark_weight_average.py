"""The WeightAverage benchmarks run end to end: the FSDP2-sharded update on 2 gloo ranks
(benchmarks/sharded.py) and the GPU offload benchmark's CPU paths (benchmarks/offload.py).

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
from benchmarks import harness, offload, sharded

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- sharded update (CPU, gloo)


def test_group_shapes_are_the_transformer_set_cut_per_layer():
    groups = sharded.group_shapes(**sharded.SETS["transformer"][0])
    assert len(groups) == 24 + 2 and [len(g) for g in groups] == [2] + [12] * 24 + [2]
    flat = [s for g in groups for s in g]
    assert flat == list(bench_cases.get_case("transformer").shapes)
    assert sum(math.prod(s) for s in flat) == bench_cases.TRANSFORMER_PARAMS


def test_sharded_benchmark_on_two_ranks_writes_sane_json(tmp_path, capsys):
    output = tmp_path / "sharded.json"
    report = sharded.main(["--set", "tiny", "--world", "2", "--repeats", "2", "--warmup", "1", "--target-ms", "1",
                           "--output", str(output), "--timeout", "240"])
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["schema"] == "sharded-1"
    assert saved["machine"]["ranks"] == 2 and saved["machine"]["threads_per_rank"] == 1
    assert "2 gloo ranks" in saved["machine"]["description"]
    expected = bench_cases.gpt_shapes(**sharded.SETS["tiny"][0])
    assert saved["set"]["num_tensors"] == len(expected)
    assert saved["set"]["num_params"] == sum(math.prod(s) for s in expected)
    assert saved["set"]["full_param_bytes"] == 4 * saved["set"]["num_params"]
    assert set(saved["candidates"]) == set(sharded.CANDIDATES)
    for key, candidate in saved["candidates"].items():
        assert [r["rank"] for r in candidate["per_rank"]] == [0, 1], key
        for rank in candidate["per_rank"]:
            assert rank["repeats"] == 2 and len(rank["samples_ms"]) == 2 and rank["median_ms"] > 0
        assert candidate["slowest_rank"]["median_ms"] >= max(r["min_ms"] for r in candidate["per_rank"])
        assert candidate["inner"] >= 1
        assert candidate["check_max_abs_diff_vs_weight_average"] <= 1e-6, key
    memory = {key: c["averages_bytes_per_rank"] for key, c in saved["candidates"].items()}
    full = saved["set"]["full_param_bytes"]
    # Every rank holds its shards' averages (about half) or the full model's.
    assert memory["gather_full_tensor"] == memory["gather_unshard"] == full
    assert memory["weight_average"] == memory["local_foreach_lerp"] == saved["set"]["local_param_bytes_per_rank"][0]
    assert full / 2 <= memory["weight_average"] < full
    assert saved["candidates"]["weight_average"]["gathered_bytes_per_update_per_rank"] == 0
    assert saved["candidates"]["gather_full_tensor"]["gathered_bytes_per_update_per_rank"] == full
    assert set(saved["speedups"]) == {f"weight_average vs {k}" for k in sharded.CANDIDATES if k != "weight_average"}
    assert saved["speedups"]["weight_average vs gather_full_tensor"]["averages_memory"] == full / memory[
        "weight_average"]
    out = capsys.readouterr().out
    assert "speedup weight_average vs gather_full_tensor" in out and f"saved {output}" in out


def test_sharded_parse_args_and_default_output():
    full = sharded.parse_args([])
    assert (full.set, full.world, full.threads) == ("transformer", 2, 1) and full.repeats >= harness.MIN_REPEATS
    assert sharded.default_output(full, "slug") == harness.RESULTS_DIR / "slug-sharded-transformer-2ranks.json"
    quick = sharded.parse_args(["--quick"])
    assert quick.set == "small" and quick.repeats < harness.MIN_REPEATS
    assert sharded.default_output(quick, "slug") == harness.SCRATCH_DIR / "slug-sharded-small-2ranks.json"
    with pytest.raises(SystemExit):
        sharded.parse_args(["--world", "0"])


def test_committed_sharded_results_are_a_full_transformer_run():
    found = sorted(harness.RESULTS_DIR.glob("*-sharded-*.json"))
    assert found, "no committed sharded results"
    for path in found:
        report = json.loads(path.read_text())
        assert report["schema"] == sharded.SCHEMA and not report["settings"]["quick"]
        assert report["set"]["num_params"] == bench_cases.TRANSFORMER_PARAMS
        assert report["machine"]["description"]
    # README.md's table is written by hand from the committed run: it names the file and quotes its medians.
    readme = (REPO_ROOT / "README.md").read_text()
    report = json.loads(found[-1].read_text())
    assert f"benchmarks/results/{found[-1].name}" in readme
    for candidate in report["candidates"].values():
        for rank in candidate["per_rank"]:
            assert f"{rank['median_ms']:.1f} ({rank['q1_ms']:.1f}-{rank['q3_ms']:.1f})" in readme


# ----------------------------------------------------------------- offloaded update (GPU)


def test_offload_model_is_resnet50():
    with torch.device("meta"):
        model = offload.MODELS["resnet50"][0]()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert sorted(shapes) == sorted(bench_cases.resnet50_shapes())
    assert sum(math.prod(s) for s in shapes) == bench_cases.RESNET50_PARAMS


def test_offload_parse_args():
    full = offload.parse_args([])
    assert (full.device, full.model, full.amp, full.channels_last) == ("cuda", "resnet50", "bf16", True)
    assert full.modes == ["none", "device", "offload"] and full.steps >= 50 and full.rounds >= 3
    assert offload.default_output(full, "slug") == harness.RESULTS_DIR / "slug-offload.json"
    quick = offload.parse_args(["--quick", "--modes", "offload", "none"])
    assert quick.batch_size == 64 and quick.steps < full.steps and quick.modes == ["none", "offload"]
    assert offload.default_output(quick, "slug").parent == harness.SCRATCH_DIR
    cpu = offload.parse_args(["--device", "cpu", "--model", "tiny"])
    assert cpu.amp == "none" and offload.default_output(cpu, "slug") == harness.SCRATCH_DIR / "slug-offload-tiny.json"
    for bad in (["--steps", "0"], ["--warmup", "0"], ["--modes", "both"]):
        with pytest.raises(SystemExit):
            offload.parse_args(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without a CUDA device")
def test_offload_skips_without_cuda(capsys):
    assert offload.main(["--quick"]) == {"skipped": offload.SKIP_NO_CUDA}
    assert capsys.readouterr().out.strip() == offload.SKIP_NO_CUDA
    done = subprocess.run([sys.executable, "-m", "benchmarks.offload", "--quick"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipping the offload benchmark: no CUDA device" in done.stdout


def test_offload_cpu_plumbing_run(tmp_path, capsys):
    output = tmp_path / "offload.json"
    report = offload.main(["--device", "cpu", "--model", "tiny", "--batch-size", "4", "--steps", "2", "--warmup",
                           "1", "--rounds", "2", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["schema"] == "offload-1" and saved["device"]["type"] == "cpu"
    assert list(saved["modes"]) == ["none", "device", "offload"]
    for mode, entry in saved["modes"].items():
        assert len(entry["rounds"]) == 2 and entry["wall_ms_per_step_median"] > 0
        assert all(r["event_step"]["count"] == 2 for r in entry["rounds"])
        assert ("update_call_host_median_ms" in entry) == (mode != "none")
    assert saved["modes"]["none"]["overhead_wall"] == 0
    assert saved["averages"]["offload"]["averages_device"] == "cpu"
    assert saved["averages"]["device"]["averages_bytes"] == 4 * saved["model"]["num_params"]
    assert "target: offloaded EMA within 5% of no EMA" in capsys.readouterr().out


def test_benchmark_scripts_run_as_scripts():
    for script in ("sharded.py", "offload.py"):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"],
                              capture_output=True, text=True, cwd=REPO_ROOT / "tests", timeout=120)
        assert done.returncode == 0, done.stderr
        assert "--quick" in done.stdout
