"""Where every CUDA kernel runs: on the caller's current stream, and on the tensors' device.

For each op, the inputs are written on a side stream right after a long
``torch.cuda._sleep`` there, and the op is called on that stream. An op that
launched on the legacy default stream (or any stream but the current one)
would run before the write lands (torch's side streams do not synchronize
with the legacy stream) and compute from the stale values: the result would
differ from the eager one. The second test runs every op on ``cuda:1``
tensors while ``cuda:0`` is current (skipped on one GPU).

Run on a GPU machine with ``pytest -m cuda``; elsewhere every test skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
import torch

import swa_fast

from helpers import make

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)


OPS = torch.ops.swa_fast
# About 50 ms at the H200's ~2 GHz: far longer than the host needs to launch the op.
SLEEP_CYCLES = 100_000_000
SIZES = [5, 4096, 70_001]


@dataclass
class OpCase:
    name: str
    # inputs(device, seed) -> named tensors the op reads (and, for in-place ops, writes)
    inputs: Callable[[str, int], Dict[str, object]]
    # run(inputs) -> the tensors to compare (outputs, or the written inputs)
    run: Callable[[Dict[str, object]], List[torch.Tensor]]


def lists(device, seed, dtype=torch.float32):
    return [make(n, dtype, device, seed + i) for i, n in enumerate(SIZES)]


def average_inputs(device, seed):
    return {"averaged": lists(device, seed), "current": lists(device, seed + 10)}


def average_run(t):
    swa_fast.average_(t["averaged"], t["current"], 0.3)
    return t["averaged"]


def moments_inputs(device, seed):
    mean = lists(device, seed)
    return {"mean": mean, "sq": [m * m for m in mean], "current": lists(device, seed + 10, torch.bfloat16)}


def moments_run(t):
    swa_fast.average_moments_(t["mean"], t["sq"], t["current"], 0.3)
    return t["mean"] + t["sq"]


def swag_inputs(device, seed):
    mean = lists(device, seed)
    return {"mean": mean, "variance": [m.abs() for m in mean], "deviation": lists(device, seed + 20),
            "current": lists(device, seed + 10, torch.bfloat16)}


def swag_run(t):
    swa_fast.swag_moments_(t["mean"], t["variance"], t["deviation"], t["current"], 0.3)
    return t["mean"] + t["variance"] + t["deviation"]


def nonfinite_inputs(device, seed):
    tensors = lists(device, seed)
    tensors[-1][seed % 1000] = float("nan") if seed % 2 == 0 else 1.0
    return {"tensors": tensors}


def nonfinite_run(t):
    return [swa_fast.nonfinite_flag(t["tensors"])]


def distance_inputs(device, seed):
    return {"a": lists(device, seed, torch.bfloat16), "b": lists(device, seed + 10)}


def distance_run(t):
    per_tensor, total = OPS.distance(t["a"], t["b"])
    return [per_tensor, total]


def ghost_inputs(device, seed):
    return {
        "x": make((12, 8, 6, 6), torch.float32, device, seed, offset=1.0),
        "dy": make((12, 8, 6, 6), torch.float32, device, seed + 1),
        "weight": make(8, torch.float32, device, seed + 2, offset=2.0),
        "bias": make(8, torch.float32, device, seed + 3),
        "running_mean": make(8, torch.float32, device, seed + 4),
        "running_var": make(8, torch.float32, device, seed + 5, offset=3.0),
        "tracked": torch.tensor(seed + 2, device=device),
    }


def ghost_run(t):
    out, mean, var = OPS.ghost_batch_norm(t["x"], t["weight"], t["bias"], 4, 1e-5)
    grads = OPS.ghost_batch_norm_backward(t["dy"], t["x"], t["weight"], mean, var, 4, 1e-5, True)
    OPS.ghost_batch_norm_update_stats_(t["running_mean"], t["running_var"], t["tracked"], mean, var, 12, 4, 36,
                                       None, False)
    return [out, mean, var, *grads, t["running_mean"], t["running_var"], t["tracked"]]


CASES = [
    OpCase("average_", average_inputs, average_run),
    OpCase("average_moments_", moments_inputs, moments_run),
    OpCase("swag_moments_", swag_inputs, swag_run),
    OpCase("nonfinite_flag", nonfinite_inputs, nonfinite_run),
    OpCase("distance", distance_inputs, distance_run),
    OpCase("ghost_batch_norm", ghost_inputs, ghost_run),
]


def tensors_of(inputs: Dict[str, object]) -> List[torch.Tensor]:
    found = []
    for value in inputs.values():
        found.extend(value if isinstance(value, list) else [value])
    return found


def assert_same(got: List[torch.Tensor], want: List[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.device == w.device, f"result {i} on {g.device}, expected {w.device}"
        assert torch.equal(g, w), f"result {i} differs"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_kernel_runs_on_the_current_stream(case):
    fresh = case.inputs("cuda", 0)
    expected = case.run(case.inputs("cuda", 0))
    work = case.inputs("cuda", 1)  # stale values until the side stream overwrites them
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for target, source in zip(tensors_of(work), tensors_of(fresh)):
            target.copy_(source)  # lands only after the sleep, on this stream
        got = case.run(work)
    torch.cuda.synchronize()
    assert_same(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_kernel_runs_on_its_tensors_device(case):
    with torch.cuda.device(1):
        expected = case.run(case.inputs("cuda:1", 0))
    with torch.cuda.device(0):
        got = case.run(case.inputs("cuda:1", 0))
    torch.cuda.synchronize()
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert_same(got, expected)
