"""pytest-benchmark microbenchmarks of one weight-distance pass, the same candidates as
``benchmarks/run.py --suites distance`` (torch._foreach_norm of _foreach_sub, a per-tensor
loop, swa_fast's fused op, and a copy of as many bytes as the op reads).

    pytest benchmarks/test_bench_distance.py                      # timings (CPU; add --benchmark-json=...)
    pytest benchmarks/test_bench_distance.py --benchmark-disable  # smoke: every candidate runs once

For candidates interleaved in one process with GB/s and speedups, use the runner
(``python -m benchmarks.run --suites distance``). Timings here are never assertions.
"""

import pytest
import torch

from benchmarks.distance import CASES, build_candidates

CASE_NAMES = ["distance_resnet50", "distance_transformer"]
CANDIDATES = ["torch_foreach", "torch_loop", "swa_fast_distance", "copy"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=CASE_NAMES)
def case_candidates(request):
    """Every candidate of one case, built once per module and case."""
    candidates = {c.key: c for c in build_candidates(CASES[request.param], DEVICE)}
    yield request.param, candidates
    candidates.clear()


def _synchronized(fn):
    if DEVICE != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


@pytest.mark.benchmark
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_distance(benchmark, case_candidates, candidate):
    case_name, candidates = case_candidates
    chosen = candidates[candidate]
    benchmark.group = f"{case_name} ({DEVICE})"
    benchmark.name = f"{case_name}:{candidate}"
    benchmark.extra_info.update(label=chosen.label, bytes_per_update=chosen.bytes_per_update)
    benchmark.pedantic(_synchronized(chosen.fn), rounds=10, warmup_rounds=1, iterations=1)
