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
from benchmarks.harness import pedantic_benchmark

CASE_NAMES = ["distance_resnet50", "distance_transformer"]
CANDIDATES = ["torch_foreach", "torch_loop", "swa_fast_distance", "copy"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=CASE_NAMES)
def case_candidates(request):
    """Every candidate of one case, built once per module and case."""
    candidates = {c.key: c for c in build_candidates(CASES[request.param], DEVICE)}
    yield request.param, candidates
    candidates.clear()


@pytest.mark.benchmark
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_distance(benchmark, case_candidates, candidate):
    case_name, candidates = case_candidates
    pedantic_benchmark(benchmark, case_name, candidates[candidate], DEVICE)
