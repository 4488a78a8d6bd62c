"""pytest-benchmark microbenchmarks of one averaging update, the same candidates as
``benchmarks/run.py`` (torch AveragedModel SWA/EMA, torch._foreach_lerp_, swa_fast
AveragedModel SWA/EMA, swa_fast.average_, and a copy of the same bytes).

    pytest benchmarks                              # timings (CPU; add --benchmark-json=...)
    pytest benchmarks --benchmark-disable          # smoke: every candidate runs once

Every AveragedModel has done its first (copy) update before it is timed. For
candidates interleaved in one process with GB/s and speedups, use the runner
(``python -m benchmarks.run``). Timings here are never assertions.
"""

import pytest
import torch

from benchmarks.averaging import build_candidates
from benchmarks.cases import get_case
from benchmarks.harness import pedantic_benchmark

CASE_NAMES = ["resnet50", "transformer"]
CANDIDATES = [
    "torch_swa",
    "torch_ema",
    "torch_foreach_lerp",
    "swa_fast_swa",
    "swa_fast_ema",
    "swa_fast_average_",
    "copy",
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=CASE_NAMES)
def case_candidates(request):
    """Every candidate of one case, built once per module and case."""
    candidates = {c.key: c for c in build_candidates(get_case(request.param), DEVICE)}
    yield request.param, candidates
    candidates.clear()


@pytest.mark.benchmark
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_update(benchmark, case_candidates, candidate):
    case_name, candidates = case_candidates
    pedantic_benchmark(benchmark, case_name, candidates[candidate], DEVICE)
