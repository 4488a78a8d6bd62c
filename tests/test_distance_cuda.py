"""GPU tests of the distance op's CUDA kernel (csrc/cuda/distance_cuda.cu) and of the tracker on a GPU.

What only the CUDA path has: the vector / scalar split (whose per-thread order
must not depend on alignment), the launch loop (more tensors or chunks than one
launch holds, more tensors than one per-tensor reduction launch holds), grouping
by dtype pair, no host sync, CUDA-graph capture, and a CPU snapshot streamed to
the GPU. Run on a GPU machine with ``pytest -m cuda``; elsewhere every test skips.
"""

from __future__ import annotations

import pytest
import torch

from swa_fast.distance import WeightDistanceTracker, distance_norms, weight_distance

import helpers
from distance_reference import distance_reference

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)


DEVICE = "cuda"
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Around the vector widths (2, 4, 8 elements), a tail after whole vectors, one
# chunk (65536) and its neighbours, several chunks with a ragged end.
SIZES = [0, 1, 3, 4, 5, 9, 1023, 65_535, 65_536, 65_537, 200_003]


def make(n, dtype, seed, device=DEVICE):
    """helpers.make with the seed before the device (most tensors here are on the GPU)."""
    return helpers.make(n, dtype, device, seed)


def misaligned_copy(t):
    """The same values at an address one element past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:]
    view.copy_(t.reshape(-1))
    return view.view(t.shape)


def assert_close_to_reference(a, b, result):
    want_per, want_total = distance_reference(a, b)
    acc = result.per_tensor.dtype
    rtol = 64 * torch.finfo(acc).eps
    assert torch.allclose(result.per_tensor.cpu().double(), want_per, rtol=rtol, atol=0)
    assert result.total.item() == pytest.approx(want_total.item(), rel=rtol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_b", [True, False], ids=["a-b", "a"])
def test_parity_with_float64_reference(dtype, with_b):
    a = [make(n, dtype, i) for i, n in enumerate(SIZES)]
    b = [make(n, dtype, 100 + i) for i, n in enumerate(SIZES)] if with_b else None
    result = distance_norms(a, b)
    assert result.per_tensor.device.type == "cuda" and result.total.device.type == "cuda"
    assert result.per_tensor.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.per_tensor[0].item() == 0.0
    assert_close_to_reference(a, b, result)


@pytest.mark.parametrize(
    "a_dtype,b_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.float16, torch.bfloat16), (torch.float32, torch.float64), (torch.bfloat16, torch.float64)],
)
def test_mixed_dtypes(a_dtype, b_dtype):
    a = [make(n, a_dtype, i) for i, n in enumerate(SIZES)]
    b = [make(n, b_dtype, 50 + i) for i, n in enumerate(SIZES)]
    assert_close_to_reference(a, b, distance_norms(a, b))


def test_groups_keep_the_callers_order():
    # Alternating dtype pairs land in different launch groups; results must
    # still come back in list order.
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    a = [make(1 + (i * 37) % 3000, dtypes[i % 4], i) for i in range(200)]
    b = [make(x.numel(), dtypes[(i + 1) % 4], 1000 + i) for i, x in enumerate(a)]
    assert_close_to_reference(a, b, distance_norms(a, b))


def test_more_tensors_and_chunks_than_one_launch_holds():
    # 1000 tensors: several harness launches (110/64 tensors each) and three
    # per-tensor reduction launches (448 each); one 30M-element tensor spans
    # more chunks (458) than one launch's 320 blocks.
    sizes = [30_000_001] + [(i * 13) % 97 for i in range(1000)]
    a = [make(n, torch.float32, i) for i, n in enumerate(sizes)]
    b = [make(n, torch.bfloat16, 5000 + i) for i, n in enumerate(sizes)]
    result = distance_norms(a, b)
    want_per, want_total = distance_reference(a, b)
    assert torch.allclose(result.per_tensor.cpu().double(), want_per, rtol=1e-5)
    assert result.total.item() == pytest.approx(want_total.item(), rel=1e-5)


def test_close_to_the_cpu_kernel():
    a = [make(n, torch.bfloat16, i, "cpu") for i, n in enumerate(SIZES)]
    b = [make(n, torch.float32, 70 + i, "cpu") for i, n in enumerate(SIZES)]
    cpu = distance_norms(a, b)
    gpu = distance_norms([x.cuda() for x in a], [y.cuda() for y in b])
    assert torch.allclose(gpu.per_tensor.cpu(), cpu.per_tensor, rtol=1e-5)
    assert gpu.total.item() == pytest.approx(cpu.total.item(), rel=1e-5)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, None), (torch.float64, torch.float32)])
def test_same_bits_every_call_and_whatever_the_alignment(dtypes):
    a_dtype, b_dtype = dtypes
    sizes = [200_003, 65_536, 7, 1_000_000]
    a = [make(n, a_dtype, i) for i, n in enumerate(sizes)]
    b = None if b_dtype is None else [make(n, b_dtype, 40 + i) for i, n in enumerate(sizes)]
    first = distance_norms(a, b)
    for _ in range(5):
        again = distance_norms(a, b)
        assert torch.equal(again.per_tensor, first.per_tensor) and torch.equal(again.total, first.total)
    # Misaligned copies take the scalar path, which reads the same elements per
    # thread in the same order as the vector path: the same bits.
    shifted = distance_norms([misaligned_copy(x) for x in a], None if b is None else [misaligned_copy(y) for y in b])
    assert torch.equal(shifted.per_tensor, first.per_tensor) and torch.equal(shifted.total, first.total)


# ---------------------------------------------------------------------------
# No host sync, CUDA graphs, registration
# ---------------------------------------------------------------------------


def test_no_host_sync():
    a = [make(n, torch.bfloat16, i) for i, n in enumerate(SIZES)]
    b = [make(n, torch.float32, 9 + i) for i, n in enumerate(SIZES)]
    distance_norms(a, b)  # warm up the caching allocator
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = distance_norms(a, b)
        weight_distance(a, b)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert_close_to_reference(a, b, result)


def test_cuda_graph_capture_and_replay():
    a = [make(n, torch.float32, i) for i, n in enumerate([100_000, 5, 70_000])]
    b = [make(n, torch.bfloat16, 20 + i) for i, n in enumerate([100_000, 5, 70_000])]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        distance_norms(a, b)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = distance_norms(a, b)
    with torch.no_grad():
        for x in a:
            x.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(a, b, captured)


def test_opcheck_on_cuda():
    a = [make(33, torch.float32, 0), make(5, torch.bfloat16, 1), make(0, torch.float32, 2)]
    b = [make(33, torch.float16, 3), make(5, torch.float32, 4), make(0, torch.float32, 5)]
    torch.library.opcheck(torch.ops.swa_fast.distance.default, (a, b))
    torch.library.opcheck(torch.ops.swa_fast.distance.default, (a, None))


def test_device_mismatch_is_named():
    with pytest.raises(RuntimeError, match=r"b\[1\] is on cpu but a\[0\] is on cuda:0"):
        distance_norms([make(3, torch.float32, 0), make(3, torch.float32, 1)],
                       [make(3, torch.float32, 2), make(3, torch.float32, 3, "cpu")])


# ---------------------------------------------------------------------------
# The tracker on a GPU
# ---------------------------------------------------------------------------


def gpu_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()


def test_tracker_with_a_cpu_snapshot_streams_it_without_a_sync():
    model = gpu_model()
    on_gpu = WeightDistanceTracker(model)
    on_cpu = WeightDistanceTracker(model, device="cpu", bucket_bytes=100_000)
    assert all(s.device.type == "cpu" and s.is_pinned() for s in on_cpu.reference)
    assert len(on_cpu._buckets()) > 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    on_gpu.update(1)
    on_cpu.update(1)  # warm-up
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3):
            on_gpu.update(step)
            on_cpu.update(step)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert on_cpu.last_total.device.type == "cuda"
    for got, want in zip(on_cpu.history, on_gpu.history):
        assert got["total"] == pytest.approx(want["total"], rel=1e-6)
        for name in on_gpu.names:
            assert got[name] == pytest.approx(want[name], rel=1e-6)


def test_tracker_of_a_bf16_model_with_an_fp32_snapshot():
    model = gpu_model().to(torch.bfloat16)
    w0 = [p.detach().float().clone() for p in model.parameters()]
    tracker = WeightDistanceTracker(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.125)
    tracker.update(10)
    want = distance_reference(list(model.parameters()), w0)[1].item()
    assert tracker.history[0]["total"] == pytest.approx(want, rel=1e-5)
