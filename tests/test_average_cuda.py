"""GPU tests of the CUDA kernels (csrc/cuda/average_cuda.cu, multi_tensor_apply.cuh).

What only the CUDA path has: bitwise parity with torch's own CUDA lerp, the
vectorized / scalar split (sizes around the vector width, misaligned views),
the launch loop (more tensors or chunks than one launch holds, tensors over
2^31 elements), device-side weight and skip (no host sync, CUDA graphs).
Run on a GPU machine with ``pytest -m cuda``; elsewhere every test skips.
"""

from __future__ import annotations

import pytest
import torch

import swa_fast

import helpers

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)


DEVICE = "cuda"
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 0 and 1; around the vector widths (2, 4, 8 elements); a tail after whole
# vectors; one chunk (65536) plus one; several chunks with a ragged end.
SIZES = [0, 1, 3, 4, 5, 1023, 65537, 200003]
# Both branches of torch's lerp (|w| < 0.5 and not), and values whose
# float32 rounding lands on either side of 0.5.
WEIGHTS = [1e-3, 0.1, 0.3, 0.49999997, 0.5, 0.7, 0.999]


def make(n, dtype, seed, device=DEVICE):
    """helpers.make with the seed before the device (most tensors here are on the GPU)."""
    return helpers.make(n, dtype, device, seed)


def foreach_lerp(averaged, current, weight):
    """torch's own CUDA lerp on clones (what swa_utils' foreach path computes)."""
    result = [a.clone() for a in averaged]
    torch._foreach_lerp_(result, list(current), weight)
    return result


def moments_expected(mean, sq_mean, current, weight):
    """``mean.lerp_(x, w); sq_mean.lerp_(x * x, w)`` with torch's ops.

    For fp32/fp64 this is literally that; for fp16/bf16 (and lower-precision
    current) it runs in fp32 and rounds once at the end, since the kernel keeps
    x*x in the arithmetic type instead of rounding it to fp16/bf16 first.
    """
    opmath = torch.float64 if mean.dtype == torch.float64 else torch.float32
    m, s, x = mean.to(opmath), sq_mean.to(opmath), current.to(opmath)
    if weight == 1.0:
        return x.to(mean.dtype), (x * x).to(mean.dtype)
    m.lerp_(x, weight)
    s.lerp_(x * x, weight)
    return m.to(mean.dtype), s.to(mean.dtype)


def assert_equal_lists(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"tensor {i}"
        assert torch.equal(g, w), f"tensor {i} differs: max |diff| {(g.double() - w.double()).abs().max().item()}"


# ---------------------------------------------------------------------------
# average_: bitwise parity with torch._foreach_lerp_
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_bitwise_equal_to_foreach_lerp(dtype, weight):
    averaged = [make(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, dtype, seed=100 + i) for i, n in enumerate(SIZES)]
    expected = foreach_lerp(averaged, current, weight)
    swa_fast.average_(averaged, current, weight)
    assert_equal_lists(averaged, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight", [0.2, 0.6])
def test_device_weight_tensor(dtype, weight_dtype, weight):
    w = torch.tensor(weight, dtype=weight_dtype, device=DEVICE)
    averaged = [make(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, dtype, seed=40 + i) for i, n in enumerate(SIZES)]
    # A float32 weight converts exactly to the Python float the reference gets.
    expected = foreach_lerp(averaged, current, float(w.cpu()))
    swa_fast.average_(averaged, current, w)
    assert_equal_lists(averaged, expected)


@pytest.mark.parametrize("cur_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [0.1, 0.75])
def test_lower_precision_current_into_fp32(cur_dtype, weight):
    weight = float(torch.tensor(weight, dtype=torch.float32))  # the weight the kernel computes with
    averaged = [make(n, torch.float32, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, cur_dtype, seed=60 + i) for i, n in enumerate(SIZES)]
    before = [a.clone() for a in averaged]
    # Exact: bf16/fp16 -> fp32 is exact, so this is the same arithmetic.
    exact = foreach_lerp(averaged, [c.float() for c in current], weight)
    swa_fast.average_(averaged, current, weight)
    assert_equal_lists(averaged, exact)
    # And against float64: b - a and the fma round once each (half an ulp
    # each), so the error is within one fp32 ulp of the inputs' magnitude
    # (plus a second-order term).
    eps = torch.finfo(torch.float32).eps
    for got, a, c in zip(averaged, before, current):
        a64, c64 = a.double(), c.double()
        reference = a64 + weight * (c64 - a64)
        bound = eps * (1 + eps) * torch.maximum(a64.abs(), c64.abs())
        assert bool(((got.double() - reference).abs() <= bound).all())


@pytest.mark.parametrize(
    "avg_dtype,cur_dtype",
    [(torch.float64, torch.float32), (torch.float64, torch.float16), (torch.float64, torch.bfloat16)],
)
def test_lower_precision_current_into_fp64(avg_dtype, cur_dtype):
    averaged = [make(n, avg_dtype, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, cur_dtype, seed=70 + i) for i, n in enumerate(SIZES)]
    expected = foreach_lerp(averaged, [c.double() for c in current], 0.3)
    swa_fast.average_(averaged, current, 0.3)
    assert_equal_lists(averaged, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_weight_one_is_an_exact_copy_even_of_inf(dtype):
    averaged = [make(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, dtype, seed=20 + i) for i, n in enumerate(SIZES)]
    for c in current:
        if c.numel() >= 5:
            c[1] = float("inf")
            c[-2] = float("-inf")
    for weight in (1.0, torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, dtype=torch.float64, device=DEVICE)):
        targets = [a.clone() for a in averaged]
        swa_fast.average_(targets, current, weight)
        assert_equal_lists(targets, current)


def test_weight_one_copies_bf16_into_fp32_exactly():
    averaged = [make(n, torch.float32, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, torch.bfloat16, seed=30 + i) for i, n in enumerate(SIZES)]
    current[-1][7] = float("inf")
    swa_fast.average_(averaged, current, 1.0)
    assert_equal_lists(averaged, [c.float() for c in current])


# ---------------------------------------------------------------------------
# average_moments_
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight", [0.2, 0.5, 0.8, 1.0])
def test_moments_match_two_lerps(dtype, weight):
    mean = [make(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    sq_mean = [(m.float() * m.float() + 0.5).to(dtype) for m in mean]
    current = [make(n, dtype, seed=30 + i) for i, n in enumerate(SIZES)]
    expected = [moments_expected(m, s, c, weight) for m, s, c in zip(mean, sq_mean, current)]
    swa_fast.average_moments_(mean, sq_mean, current, weight)
    assert_equal_lists(mean, [e[0] for e in expected])
    assert_equal_lists(sq_mean, [e[1] for e in expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_are_literally_torch_lerp_for_full_precision(dtype):
    mean = [make(n, dtype, seed=i) for i, n in enumerate(SIZES)]
    sq_mean = [m * m for m in mean]
    current = [make(n, dtype, seed=90 + i) for i, n in enumerate(SIZES)]
    want_mean = [m.clone().lerp_(x, 0.3) for m, x in zip(mean, current)]
    want_sq = [s.clone().lerp_(x * x, 0.3) for s, x in zip(sq_mean, current)]
    swa_fast.average_moments_(mean, sq_mean, current, 0.3)
    assert_equal_lists(mean, want_mean)
    assert_equal_lists(sq_mean, want_sq)


@pytest.mark.parametrize("cur_dtype", [torch.bfloat16, torch.float16])
def test_moments_lower_precision_current_into_fp32(cur_dtype):
    mean = [make(n, torch.float32, seed=i) for i, n in enumerate(SIZES)]
    sq_mean = [m * m for m in mean]
    current = [make(n, cur_dtype, seed=80 + i) for i, n in enumerate(SIZES)]
    expected = [moments_expected(m, s, c, 0.125) for m, s, c in zip(mean, sq_mean, current)]
    swa_fast.average_moments_(mean, sq_mean, current, 0.125)
    assert_equal_lists(mean, [e[0] for e in expected])
    assert_equal_lists(sq_mean, [e[1] for e in expected])


def test_moments_weight_one_copies_inf():
    mean = [make(1000, torch.float32, seed=0)]
    sq_mean = [make(1000, torch.float32, seed=1)]
    current = [make(1000, torch.float32, seed=2)]
    current[0][10] = float("inf")
    swa_fast.average_moments_(mean, sq_mean, current, 1.0)
    assert torch.equal(mean[0], current[0])
    assert torch.equal(sq_mean[0], current[0] * current[0])


# ---------------------------------------------------------------------------
# skip
# ---------------------------------------------------------------------------


def test_skip_true_leaves_everything_untouched():
    averaged = [make(n, dtype, seed=i) for i, (n, dtype) in enumerate(zip(SIZES, FLOAT_DTYPES * 2))]
    averaged += [torch.zeros(5, dtype=torch.long, device=DEVICE), torch.zeros((), dtype=torch.long, device=DEVICE)]
    current = [make(a.numel(), a.dtype, seed=50 + i).reshape(a.shape) for i, a in enumerate(averaged)]
    sq_mean = [a.clone() for a in averaged[:-2]]
    before = [a.clone() for a in averaged] + [s.clone() for s in sq_mean]
    skip = torch.tensor(True, device=DEVICE)
    swa_fast.average_(averaged, current, 0.5, skip=skip)
    swa_fast.average_(averaged, current, 1.0, skip=skip)
    swa_fast.average_moments_(averaged[:-2], sq_mean, current[:-2], 0.3, skip=skip)
    assert_equal_lists(averaged + sq_mean, before)

    swa_fast.average_(averaged, current, 0.5, skip=torch.tensor(False, device=DEVICE))
    assert_equal_lists(averaged[:-2], foreach_lerp(before[: len(averaged) - 2], current[:-2], 0.5))
    assert_equal_lists(averaged[-2:], current[-2:])


# ---------------------------------------------------------------------------
# nonfinite_flag
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_flag_finds_any_position(dtype, bad):
    tensors = [make(n, dtype, seed=i) for i, n in enumerate([5, 200003, 1, 65537])]
    tensors.append(torch.arange(4, device=DEVICE))  # integers are ignored
    flag = swa_fast.nonfinite_flag(tensors)
    assert flag.dtype == torch.bool and flag.dim() == 0 and flag.device.type == "cuda"
    assert not flag.item()
    # first, last, vector tails, chunk boundaries
    positions = [(0, 0), (0, 4), (1, 0), (1, 7), (1, 65535), (1, 65536), (1, 131072), (1, 200002), (2, 0), (3, 65536)]
    for index, position in positions:
        poisoned = [t.clone() for t in tensors]
        poisoned[index][position] = bad
        assert swa_fast.nonfinite_flag(poisoned).item(), (index, position)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_flag_half_extremes_are_finite(dtype):
    info = torch.finfo(dtype)
    values = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0], dtype=dtype, device=DEVICE)
    assert not swa_fast.nonfinite_flag([values]).item()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_flag_reads_views(dtype):
    base = make(3 * 70000, dtype, seed=5)
    views = [
        base[1 : 1 + 70001],  # storage offset: misaligned, read in place
        make(300 * 301, dtype, seed=6).reshape(300, 301).t(),  # dense but not contiguous: read in place
        base[::3],  # not dense: read through a contiguous copy
    ]
    assert not swa_fast.nonfinite_flag(views).item()
    for view in views:
        last = tuple(s - 1 for s in view.shape)
        original = view[last].clone()
        view[last] = float("nan")
        assert swa_fast.nonfinite_flag(views).item()
        view[last] = original
    assert not swa_fast.nonfinite_flag(views).item()


def test_nonfinite_flag_of_only_integers_is_false():
    flag = swa_fast.nonfinite_flag([torch.arange(10, device=DEVICE), torch.ones(3, dtype=torch.bool, device=DEVICE)])
    assert flag.device.type == "cuda" and not flag.item()


# ---------------------------------------------------------------------------
# Alignment: the vectorized path and its scalar fallback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("which", ["current", "averaged", "both"])
def test_misaligned_views(dtype, offset, which):
    sizes = [1, 5, 1023, 65537, 200003]
    averaged, current = [], []
    for i, n in enumerate(sizes):
        a = make(n + offset, dtype, seed=i)[offset:] if which in ("averaged", "both") else make(n, dtype, seed=i)
        c = make(n + offset, dtype, seed=20 + i)[offset:] if which in ("current", "both") else make(n, dtype, seed=20 + i)
        averaged.append(a)
        current.append(c)
    assert averaged[0].storage_offset() == (offset if which != "current" else 0)
    expected = foreach_lerp(averaged, current, 0.3)
    swa_fast.average_(averaged, current, 0.3)
    assert_equal_lists(averaged, expected)


@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_moments_and_mixed_precision(offset):
    n = 65537 + 11
    mean = make(n + offset, torch.float32, seed=0)[offset:]
    sq_mean = make(n + 2 * offset, torch.float32, seed=1)[2 * offset :]
    current = make(n + offset, torch.bfloat16, seed=2)[offset:]
    expected = moments_expected(mean, sq_mean, current, 0.7)
    swa_fast.average_moments_([mean], [sq_mean], [current], 0.7)
    assert torch.equal(mean, expected[0])
    assert torch.equal(sq_mean, expected[1])


# ---------------------------------------------------------------------------
# The launch loop: many tensors, many chunks, huge tensors
# ---------------------------------------------------------------------------


def test_more_tensors_than_one_launch_holds():
    # 500 small tensors (a launch holds 64 at depth 2), a few multi-chunk ones
    # in between, and one tensor with more chunks than a launch has blocks
    # (320), so a partly launched tensor is carried into the next launch.
    sizes = [1 + (i * 37) % 300 for i in range(500)]
    sizes[100] = 5 * 65536 + 17
    sizes[250] = 330 * 65536 + 5
    sizes[251] = 0
    sizes[400] = 65536
    averaged = [make(n, torch.float32, seed=i) for i, n in enumerate(sizes)]
    current = [make(n, torch.float32, seed=1000 + i) for i, n in enumerate(sizes)]
    expected = foreach_lerp(averaged, current, 0.05)
    swa_fast.average_(averaged, current, 0.05)
    assert_equal_lists(averaged, expected)


def test_many_tensors_mixed_dtypes_and_moments():
    dtypes = FLOAT_DTYPES
    sizes = [1 + (i * 53) % 2000 for i in range(300)]
    sizes[17] = 3 * 65536 + 1
    mean = [make(n, dtypes[i % 4], seed=i) for i, n in enumerate(sizes)]
    sq_mean = [m * m for m in mean]
    current = [make(n, dtypes[i % 4], seed=500 + i) for i, n in enumerate(sizes)]
    expected = [moments_expected(m, s, c, 0.2) for m, s, c in zip(mean, sq_mean, current)]
    swa_fast.average_moments_(mean, sq_mean, current, 0.2)
    assert_equal_lists(mean, [e[0] for e in expected])
    assert_equal_lists(sq_mean, [e[1] for e in expected])


def test_nonfinite_flag_over_many_tensors():
    tensors = [make(1 + i % 100, torch.float16, seed=i) for i in range(400)]
    assert not swa_fast.nonfinite_flag(tensors).item()
    tensors[357][-1] = float("inf")
    assert swa_fast.nonfinite_flag(tensors).item()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs a GPU with 24 GB for two tensors over 2^31 elements",
)
def test_tensor_over_2_to_31_elements():
    n = 2**31 + 1000
    averaged = torch.zeros(n, dtype=torch.float16, device=DEVICE)
    current = torch.ones(n, dtype=torch.float16, device=DEVICE)
    averaged[-5:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float16)
    current[-3:] = torch.tensor([-1.0, 8.0, 0.5], dtype=torch.float16)
    tail = slice(n - 70000, n)  # crosses 2^31 in the last chunks
    expected_tail = foreach_lerp([averaged[tail]], [current[tail]], 0.25)[0]
    expected_head = foreach_lerp([averaged[:70000]], [current[:70000]], 0.25)[0]
    swa_fast.average_([averaged], [current], 0.25)
    assert torch.equal(averaged[tail], expected_tail)
    assert torch.equal(averaged[:70000], expected_head)
    assert not swa_fast.nonfinite_flag([averaged]).item()
    averaged[-1] = float("nan")
    assert swa_fast.nonfinite_flag([averaged]).item()
    del averaged, current
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Integer and bool tensors are copied
# ---------------------------------------------------------------------------


INT_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_tensors_are_copied(dtype):
    sizes = [0, 1, 7, 16, 33, 65537, 200003]
    averaged = [torch.zeros(n, dtype=dtype, device=DEVICE) for n in sizes]
    averaged.append(torch.zeros((), dtype=dtype, device=DEVICE))  # num_batches_tracked
    averaged.append(torch.zeros(1000, dtype=dtype, device=DEVICE)[3:])  # misaligned
    current = [make(a.numel(), dtype, seed=i).reshape(a.shape) for i, a in enumerate(averaged)]
    current[-1] = make(1000, dtype, seed=99)[1:998]  # misaligned differently
    swa_fast.average_(averaged, current, 0.3)
    assert_equal_lists(averaged, current)


def test_integer_and_floating_tensors_in_one_call():
    averaged = [make(100, torch.float32, seed=0), torch.zeros((), dtype=torch.long, device=DEVICE)]
    averaged += [torch.zeros(9, dtype=torch.bool, device=DEVICE), make(9, torch.bfloat16, seed=1)]
    current = [make(100, torch.float32, seed=2), torch.tensor(42, device=DEVICE)]
    current += [make(9, torch.bool, seed=3), make(9, torch.bfloat16, seed=4)]
    expected = foreach_lerp([averaged[0], averaged[3]], [current[0], current[3]], 0.4)
    swa_fast.average_(averaged, current, 0.4)
    assert_equal_lists([averaged[0], averaged[3]], expected)
    assert_equal_lists(averaged[1:3], current[1:3])


# ---------------------------------------------------------------------------
# Layouts, streams and devices
# ---------------------------------------------------------------------------


def test_channels_last_and_mismatched_layouts():
    shape = (4, 8, 5, 7)
    averaged = make(4 * 8 * 5 * 7, torch.float32, seed=0).reshape(shape).to(memory_format=torch.channels_last)
    current = make(4 * 8 * 5 * 7, torch.float32, seed=1).reshape(shape)  # contiguous: copied to averaged's layout
    expected = foreach_lerp([averaged], [current], 0.6)[0]
    swa_fast.average_([averaged], [current], 0.6)
    assert torch.equal(averaged, expected)
    assert averaged.is_contiguous(memory_format=torch.channels_last)


def test_runs_on_the_current_stream():
    averaged = [make(n, torch.float32, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, torch.float32, seed=10 + i) for i, n in enumerate(SIZES)]
    expected = foreach_lerp(averaged, current, 0.3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        swa_fast.average_(averaged, current, 0.3)
        flag = swa_fast.nonfinite_flag(averaged)
    torch.cuda.current_stream().wait_stream(side)
    assert_equal_lists(averaged, expected)
    assert not flag.item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_device():
    device = "cuda:1"
    averaged = [make(n, torch.float32, seed=i, device=device) for i, n in enumerate(SIZES)]
    current = [make(n, torch.float32, seed=10 + i, device=device) for i, n in enumerate(SIZES)]
    expected = foreach_lerp(averaged, current, 0.3)
    with torch.cuda.device(0):
        swa_fast.average_(averaged, current, 0.3)
        flag = swa_fast.nonfinite_flag(averaged)
    assert_equal_lists(averaged, expected)
    assert flag.device == torch.device(device) and not flag.item()


# ---------------------------------------------------------------------------
# No host sync; CUDA graphs
# ---------------------------------------------------------------------------


def test_no_host_sync_with_device_weight_and_skip():
    averaged = [make(n, dtype, seed=i) for i, (n, dtype) in enumerate(zip(SIZES, FLOAT_DTYPES * 2))]
    averaged.append(torch.zeros((), dtype=torch.long, device=DEVICE))
    current = [make(a.numel(), a.dtype, seed=30 + i).reshape(a.shape) for i, a in enumerate(averaged)]
    mean = [make(n, torch.float32, seed=i) for i, n in enumerate(SIZES)]
    sq_mean = [m * m for m in mean]
    current_bf16 = [make(n, torch.bfloat16, seed=60 + i) for i, n in enumerate(SIZES)]
    # Made before the sync check: torch.tensor(..., device=) is a blocking copy.
    weight = torch.tensor(0.25, device=DEVICE)
    weight64 = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    skip = torch.tensor(False, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swa_fast.average_(averaged, current, weight, skip=skip)
        swa_fast.average_(averaged, current, weight64)
        swa_fast.average_(averaged, current, 0.75)  # a float becomes a device tensor by a fill, not a copy
        swa_fast.average_moments_(mean, sq_mean, current_bf16, weight, skip=skip)
        flag = swa_fast.nonfinite_flag(current)
        swa_fast.average_(averaged, current, weight, skip=flag)
        swa_fast.average_moments_(mean, sq_mean, current_bf16, weight, skip=flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_replay_matches_eager():
    sizes = [3, 1023, 65537, 200003, 1]
    graph_avg = [make(n, torch.float32, seed=i) for i, n in enumerate(sizes)] + [make(77, torch.bfloat16, seed=9)]
    graph_mean = [make(n, torch.float32, seed=20 + i) for i, n in enumerate(sizes)]
    graph_sq = [m * m for m in graph_mean]
    static_cur = [make(a.numel(), a.dtype, seed=40 + i) for i, a in enumerate(graph_avg)]
    weight = torch.tensor(1.0, device=DEVICE)
    eager_avg = [a.clone() for a in graph_avg]
    eager_mean = [m.clone() for m in graph_mean]
    eager_sq = [s.clone() for s in graph_sq]

    def step(avg, mean, sq, cur):
        skip = swa_fast.nonfinite_flag(cur)
        swa_fast.average_(avg, cur, weight, skip=skip)
        swa_fast.average_moments_(mean, sq, cur[: len(sizes)], weight, skip=skip)

    # Warm up on throwaway tensors (loads the kernels outside the capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step([a.clone() for a in graph_avg], [m.clone() for m in graph_mean], [s.clone() for s in graph_sq], static_cur)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_avg, graph_mean, graph_sq, static_cur)

    for n in range(6):
        new_cur = [make(c.numel(), c.dtype, seed=100 * (n + 1) + i) for i, c in enumerate(static_cur)]
        if n == 3:
            new_cur[2][5] = float("nan")  # this step must be skipped, in the graph as in eager
        for c, new in zip(static_cur, new_cur):
            c.copy_(new)
        weight.fill_(1.0 / (n + 1))
        graph.replay()
        step(eager_avg, eager_mean, eager_sq, static_cur)
        torch.cuda.synchronize()
        assert_equal_lists(graph_avg, eager_avg)
        assert_equal_lists(graph_mean, eager_mean)
        assert_equal_lists(graph_sq, eager_sq)
    # The first step was a copy and the NaN step was skipped: still finite.
    assert not swa_fast.nonfinite_flag(graph_avg).item()


# ---------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------


def _opcheck_lists():
    averaged = [make(33, torch.float32, seed=0), make(5, torch.float64, seed=1), make(70000, torch.float16, seed=2)]
    current = [make(33, torch.bfloat16, seed=3), make(5, torch.float64, seed=4), make(70000, torch.float16, seed=5)]
    return averaged, current


@pytest.mark.parametrize("skip", [None, False, True])
def test_opcheck_average(skip):
    averaged, current = _opcheck_lists()
    averaged.append(torch.zeros((), dtype=torch.long, device=DEVICE))
    current.append(torch.tensor(7, device=DEVICE))
    weight = torch.tensor(0.25, device=DEVICE)
    skip_tensor = None if skip is None else torch.tensor(skip, device=DEVICE)
    torch.library.opcheck(torch.ops.swa_fast.average_.default, (averaged, current, weight, skip_tensor))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
def test_opcheck_average_moments(weight_dtype):
    mean, current = _opcheck_lists()
    sq_mean = [m * m for m in mean]
    weight = torch.tensor(0.25, dtype=weight_dtype, device=DEVICE)
    torch.library.opcheck(torch.ops.swa_fast.average_moments_.default, (mean, sq_mean, current, weight, None))
    torch.library.opcheck(
        torch.ops.swa_fast.average_moments_.default,
        (mean, sq_mean, current, weight, torch.tensor(False, device=DEVICE)),
    )


def test_opcheck_nonfinite_flag():
    _, current = _opcheck_lists()
    torch.library.opcheck(torch.ops.swa_fast.nonfinite_flag.default, (current,))
    current[1][2] = float("inf")
    torch.library.opcheck(torch.ops.swa_fast.nonfinite_flag.default, (current + [torch.arange(3, device=DEVICE)],))


# ---------------------------------------------------------------------------
# multi_average_: K averages from one read of current (depth buckets 3, 5, 9;
# K = 1 through average_'s own launch; K > 8 in passes of at most 8)
# ---------------------------------------------------------------------------

MULTI_PAIRS = [(d, d) for d in FLOAT_DTYPES] + [
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
    (torch.float64, torch.bfloat16),
]
# One pass at each depth bucket (1: average_'s functor; 2: depth 3; 3-4: depth 5;
# 5-8: depth 9) and several passes (9 = 8 + 1, 17 = 8 + 8 + 1, 12 = 8 + 4).
MULTI_COUNTS = [1, 2, 3, 4, 5, 8, 9, 12, 17]
MULTI_WEIGHTS = [0.0, 1.0, 0.5, 1e-3, 0.3, 0.49999997, 0.7, 0.999, 0.25]


def multi_lists(count, avg_dtype, cur_dtype, sizes=SIZES, seed=0):
    averaged = [[make(n, avg_dtype, seed=seed + 100 * k + i) for i, n in enumerate(sizes)] for k in range(count)]
    current = [make(n, cur_dtype, seed=seed + 7000 + i) for i, n in enumerate(sizes)]
    return averaged, current


def multi_weights(count, shift=0):
    return [MULTI_WEIGHTS[(k + shift) % len(MULTI_WEIGHTS)] for k in range(count)]


def separate_average_calls(averaged, current, weights, skip=None):
    """K average_ calls on clones, each with weights[k] (Python floats) as the multi op reads it."""
    expected = [[t.clone() for t in ts] for ts in averaged]
    for averages, weight in zip(expected, weights):
        swa_fast.average_(averages, current, weight, skip=skip)
    return expected


def assert_equal_multi(got, want):
    """Bitwise, NaNs (lerp towards Inf) and signed zeros included."""
    assert len(got) == len(want)
    for k, (gots, wants) in enumerate(zip(got, want)):
        assert len(gots) == len(wants)
        for i, (g, w) in enumerate(zip(gots, wants)):
            assert g.dtype == w.dtype and g.shape == w.shape, f"average {k}, tensor {i}"
            g_bits, w_bits = (t.reshape(-1).contiguous().view(torch.uint8) for t in (g, w))
            assert torch.equal(g_bits, w_bits), f"average {k}, tensor {i} differs"


def check_against_separate_calls(averaged, current, weights, weight_arg=None, skip=None):
    """multi_average_ (with weight_arg, default the weights themselves) leaves exactly what K
    average_ calls with weights[k] (and the same skip) leave."""
    expected = separate_average_calls(averaged, current, weights, skip)
    swa_fast.multi_average_(averaged, current, weights if weight_arg is None else weight_arg, skip=skip)
    assert_equal_multi(averaged, expected)


@pytest.mark.parametrize("avg_dtype,cur_dtype", MULTI_PAIRS)
@pytest.mark.parametrize("count", MULTI_COUNTS)
def test_multi_average_is_bitwise_k_separate_average_calls(avg_dtype, cur_dtype, count):
    weights = multi_weights(count)
    for weight_arg in (weights, torch.tensor(weights, dtype=torch.float64, device=DEVICE)):
        averaged, current = multi_lists(count, avg_dtype, cur_dtype, seed=count)
        check_against_separate_calls(averaged, current, weights, weight_arg=weight_arg)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("count", [2, 5, 9])
def test_multi_average_equals_foreach_lerp(dtype, count):
    weights = multi_weights(count, shift=2)  # no weight 1 among the first: torch's lerp is the reference
    weights = [w if w != 1.0 else 0.9 for w in weights]
    averaged, current = multi_lists(count, dtype, dtype, seed=3)
    expected = [foreach_lerp(averages, current, w) for averages, w in zip(averaged, weights)]
    swa_fast.multi_average_(averaged, current, weights)
    assert_equal_multi(averaged, expected)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 3, 8, 9])
def test_multi_average_device_weight_tensors(weight_dtype, count):
    values = multi_weights(count, shift=4)
    dense = torch.tensor(values, dtype=weight_dtype, device=DEVICE)
    strided = torch.tensor([v for v in values for _ in (0, 1, 2)], dtype=weight_dtype, device=DEVICE)[1::3]
    for weights in (dense, strided):
        averaged, current = multi_lists(count, torch.float32, torch.bfloat16, seed=5)
        check_against_separate_calls(averaged, current, [float(w) for w in weights.cpu()], weight_arg=weights)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_average_weight_one_is_an_exact_copy_even_of_inf(dtype):
    averaged, current = multi_lists(9, dtype, dtype, seed=9)
    for c in current:
        if c.numel() >= 5:
            c[1] = float("inf")
            c[-2] = float("-inf")
    weights = [1.0, 0.5, 1.0, 0.2, 0.7, 1.0, 0.0, 1.0, 1.0]  # the 9th in a second pass
    check_against_separate_calls(averaged, current, weights)
    for k in (0, 2, 5, 7, 8):
        assert_equal_lists(averaged[k], current)


@pytest.mark.parametrize("count", [2, 3, 8])
@pytest.mark.parametrize("which", ["current", "first", "last", "all"])
@pytest.mark.parametrize("offset", [1, 3])
def test_multi_average_misaligned_views(count, which, offset):
    sizes = [1, 5, 1023, 65537, 200003]
    averaged, current = [], []
    for i, n in enumerate(sizes):
        shifted = which in ("current", "all")
        current.append(make(n + offset, torch.bfloat16, seed=50 + i)[offset:] if shifted else make(n, torch.bfloat16, seed=50 + i))
    for k in range(count):
        shifted = which == "all" or (which == "first" and k == 0) or (which == "last" and k == count - 1)
        averaged.append([make(n + offset, torch.float32, seed=10 * k + i)[offset:] if shifted
                         else make(n, torch.float32, seed=10 * k + i) for i, n in enumerate(sizes)])
    weights = multi_weights(count, shift=3)
    check_against_separate_calls(averaged, current, weights)


@pytest.mark.parametrize("count", [2, 4, 8])
def test_multi_average_more_tensors_than_one_launch_holds(count):
    # More tensors than a depth-9 launch holds (28 at 4 KB, 242 at 32 KB), and one
    # tensor with more chunks than a launch has blocks (carried into the next launch).
    from swa_fast.ops.launch_plan import launch_limits

    limits = launch_limits()
    many = limits["max_tensors"][8] + 40
    sizes = [1 + (i * 37) % 300 for i in range(many)]
    sizes[10] = (limits["max_blocks"] + 3) * limits["chunk_size"] + 17
    sizes[11] = 0
    averaged, current = multi_lists(count, torch.float32, torch.float32, sizes=sizes, seed=1)
    weights = multi_weights(count, shift=1)
    check_against_separate_calls(averaged, current, weights)


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("count", [2, 5, 9])
def test_multi_average_copies_integer_tensors_into_every_list(dtype, count):
    sizes = [0, 1, 7, 16, 33, 65537]
    current = [make(n, dtype, seed=i) for i, n in enumerate(sizes)]
    current.append(make(1000, dtype, seed=99)[1:998])  # misaligned
    averaged = [[torch.zeros(c.shape, dtype=dtype, device=DEVICE) for c in current] for _ in range(count)]
    averaged[0][-1] = torch.zeros(1000, dtype=dtype, device=DEVICE)[3:]  # misaligned differently
    swa_fast.multi_average_(averaged, current, multi_weights(count))
    for k in range(count):
        assert_equal_lists(averaged[k], current)


def test_multi_average_mixed_dtypes_and_copies_in_one_call():
    dtypes = [(torch.float32, torch.bfloat16), (torch.float16, torch.float16), (torch.int64, torch.int64),
              (torch.float64, torch.float32), (torch.bool, torch.bool), (torch.bfloat16, torch.bfloat16)]
    sizes = [100, 65537, 1, 9, 3, 1023]
    current = [make(n, cur, seed=i) for i, ((_, cur), n) in enumerate(zip(dtypes, sizes))]
    for count in (2, 4, 6, 10):
        averaged = [[make(n, avg, seed=100 * k + i) for i, ((avg, _), n) in enumerate(zip(dtypes, sizes))]
                    for k in range(count)]
        weights = multi_weights(count, shift=5)
        check_against_separate_calls(averaged, current, weights)


def test_multi_average_skip():
    averaged, current = multi_lists(9, torch.float32, torch.float32, seed=2)
    averaged = [ts + [torch.zeros((), dtype=torch.long, device=DEVICE)] for ts in averaged]
    current = current + [torch.tensor(42, device=DEVICE)]
    before = [[t.clone() for t in ts] for ts in averaged]
    weights = multi_weights(9)
    swa_fast.multi_average_(averaged, current, weights, skip=torch.tensor(True, device=DEVICE))
    assert_equal_multi(averaged, before)
    check_against_separate_calls(averaged, current, weights, skip=torch.tensor(False, device=DEVICE))


def test_multi_average_no_host_sync():
    averaged, current = multi_lists(9, torch.float32, torch.bfloat16, seed=4)
    weights = torch.tensor(multi_weights(9), device=DEVICE)  # made before the sync check
    skip = torch.tensor(False, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swa_fast.multi_average_(averaged, current, weights, skip=skip)
        swa_fast.multi_average_(averaged[:3], current, [0.1, 0.2, 0.3])  # floats become a device tensor by fills
        swa_fast.multi_average_(averaged[:2], current, weights[:2], skip=swa_fast.nonfinite_flag(current))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_multi_average_cuda_graph_replay_matches_eager():
    sizes = [3, 1023, 65537, 1]
    graph_avg, static_cur = multi_lists(9, torch.float32, torch.bfloat16, sizes=sizes, seed=6)
    eager_avg = [[t.clone() for t in ts] for ts in graph_avg]
    weights = torch.tensor(multi_weights(9), device=DEVICE)

    def step(avg, cur):
        swa_fast.multi_average_(avg, cur, weights, skip=swa_fast.nonfinite_flag(cur))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step([[t.clone() for t in ts] for ts in graph_avg], static_cur)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_avg, static_cur)
    for n in range(4):
        for i, c in enumerate(static_cur):
            c.copy_(make(c.numel(), c.dtype, seed=300 * (n + 1) + i))
        if n == 2:
            static_cur[1][5] = float("nan")  # skipped in the graph as in eager
        weights.copy_(torch.tensor(multi_weights(9, shift=n), device=DEVICE))
        graph.replay()
        step(eager_avg, static_cur)
        torch.cuda.synchronize()
        assert_equal_multi(graph_avg, eager_avg)


@pytest.mark.parametrize("count", [1, 3, 9])
def test_opcheck_multi_average(count):
    weights = torch.linspace(0.1, 0.9, count, device=DEVICE)
    for skip in (None, torch.tensor(False, device=DEVICE)):
        averaged, current = [], None
        for _ in range(count):
            avg, current = _opcheck_lists()
            averaged += avg + [torch.zeros((), dtype=torch.long, device=DEVICE)]
        current = current + [torch.tensor(7, device=DEVICE)]
        torch.library.opcheck(torch.ops.swa_fast.multi_average_.default, (averaged, current, weights, skip))


# ---------------------------------------------------------------------------
# swag_moments_: SwagFunctor (depth 4 with deviation, depth 3 without), the same
# per-element arithmetic as the CPU kernel (explicit fma and products)
# ---------------------------------------------------------------------------

SWAG_WEIGHTS = [1e-3, 0.3, 0.49999997, 0.5, 0.7, 1.0]
# The CPU kernel rounds its multiply-adds with fma only in an AVX2+FMA build: then it is the
# reference bit for bit.
CPU_HAS_FMA = swa_fast.BUILD_INFO["cpu_capability"] == "avx2"
needs_cpu_fma = pytest.mark.skipif(not CPU_HAS_FMA, reason="the CPU kernel rounds like the GPU one only with FMA")


def swag_lists(avg_dtype, cur_dtype, sizes=SIZES, seed=0, device=DEVICE):
    """mean, variance (>= 0), deviation (stale values, overwritten) and current lists."""
    mean = [make(n, avg_dtype, seed=seed + i, device=device) for i, n in enumerate(sizes)]
    variance = [make(n, avg_dtype, seed=seed + 100 + i, device=device).abs() for i, n in enumerate(sizes)]
    deviation = [make(n, avg_dtype, seed=seed + 200 + i, device=device) for i, n in enumerate(sizes)]
    current = [make(n, cur_dtype, seed=seed + 300 + i, device=device) for i, n in enumerate(sizes)]
    return mean, variance, deviation, current


def swag_on_cpu(mean, variance, deviation, current, weight, skip=None):
    """swag_moments_'s CPU kernel on host copies: (mean, variance, deviation)."""
    m, v, d, c = ([t.cpu() for t in ts] for ts in (mean, variance, deviation, current))
    w = weight.cpu() if isinstance(weight, torch.Tensor) else weight
    swa_fast.swag_moments_(m, v, d, c, w, None if skip is None else skip.cpu())
    return m, v, d


def swag_reference(mean, variance, current, weight):
    """The formulas in float64, unrounded (weight as the kernel rounds it; w == 1 copies x)."""
    opmath = torch.float64 if mean.dtype == torch.float64 else torch.float32
    w = float(torch.tensor(weight, dtype=opmath))
    m, v, x = (t.double() for t in (mean, variance, current))
    d = x - m
    new_mean = x.clone() if weight == 1.0 else m + w * d
    return new_mean, (1 - w) * (v + w * d * d), x - new_mean


def assert_bitwise_lists(got, want):
    """Bitwise, NaNs and signed zeros included."""
    assert_equal_multi([got], [want])


@needs_cpu_fma
@pytest.mark.parametrize("avg_dtype,cur_dtype", MULTI_PAIRS)
@pytest.mark.parametrize("weight", SWAG_WEIGHTS)
def test_swag_moments_bitwise_equal_to_the_cpu_kernel(avg_dtype, cur_dtype, weight):
    for with_deviation in (True, False):
        mean, variance, deviation, current = swag_lists(avg_dtype, cur_dtype, seed=7)
        deviation = deviation if with_deviation else []
        want = swag_on_cpu(mean, variance, deviation, current, weight)
        swa_fast.swag_moments_(mean, variance, deviation, current, weight)
        for got, expected in zip((mean, variance, deviation), want):
            assert_bitwise_lists([t.cpu() for t in got], expected)


@pytest.mark.parametrize("avg_dtype,cur_dtype", MULTI_PAIRS)
@pytest.mark.parametrize("weight", SWAG_WEIGHTS)
def test_swag_moments_mean_is_average_and_the_rest_float64(avg_dtype, cur_dtype, weight):
    mean, variance, deviation, current = swag_lists(avg_dtype, cur_dtype, seed=3)
    old_mean, old_variance = [m.clone() for m in mean], [v.clone() for v in variance]
    expected_mean = [m.clone() for m in mean]
    swa_fast.average_(expected_mean, current, weight)
    swa_fast.swag_moments_(mean, variance, deviation, current, weight)
    assert_bitwise_lists(mean, expected_mean)
    opmath = torch.float64 if avg_dtype == torch.float64 else torch.float32
    eps_t, eps_s = torch.finfo(opmath).eps, torch.finfo(avg_dtype).eps
    spacing = torch.finfo(avg_dtype).tiny * eps_s
    for v, e, m, s, x in zip(variance, deviation, old_mean, old_variance, current):
        _, ref_var, ref_dev = swag_reference(m, s, x, weight)
        scale = torch.maximum(m.double().abs(), x.double().abs())
        assert bool(((v.double() - ref_var).abs() <= (6 * eps_t + eps_s) * ref_var + spacing).all())
        assert bool(((e.double() - ref_dev).abs() <= 3 * eps_t * scale + eps_s * ref_dev.abs() + spacing).all())


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
def test_swag_moments_device_weight_tensor(weight_dtype):
    w = torch.tensor(0.3, dtype=weight_dtype, device=DEVICE)
    lists = swag_lists(torch.float32, torch.bfloat16, seed=11)
    floats = [[t.clone() for t in ts] for ts in lists]
    swa_fast.swag_moments_(*lists, w)
    swa_fast.swag_moments_(*floats, float(w.cpu()))  # the same value as a Python float
    assert_equal_multi(lists[:3], floats[:3])


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("which", ["current", "mean", "deviation", "all"])
def test_swag_moments_misaligned_views(offset, which):
    # The scalar path (any pointer misaligned) gives the same bits as the vector path.
    sizes = [1, 5, 1023, 65537, 200003]
    aligned = swag_lists(torch.float32, torch.bfloat16, sizes=sizes, seed=13)
    shifted = []
    for k, ts in enumerate(aligned):
        shift = which == "all" or (which, k) in (("mean", 0), ("deviation", 2), ("current", 3))
        shifted.append([shifted_view(t, offset) if shift else t.clone() for t in ts])
    swa_fast.swag_moments_(*aligned, 0.3)
    swa_fast.swag_moments_(*shifted, 0.3)
    assert_equal_multi(shifted[:3], aligned[:3])


def shifted_view(t, offset):
    """t's values in a fresh storage, `offset` elements in (misaligned for 16-byte accesses)."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def test_swag_moments_more_tensors_than_one_launch_holds():
    # More tensors than a depth-4 launch holds (53 at 4 KB, 462 at 32 KB), and one tensor with more
    # chunks than a launch has blocks (carried into the next launch): the same bits as one call per tensor.
    from swa_fast.ops.launch_plan import launch_limits

    limits = launch_limits()
    sizes = [1 + (i * 37) % 300 for i in range(limits["max_tensors"][3] + 20)]
    sizes[10] = (limits["max_blocks"] + 3) * limits["chunk_size"] + 17
    sizes[11] = 0
    lists = swag_lists(torch.float32, torch.float32, sizes=sizes, seed=17)
    one_by_one = [[t.clone() for t in ts] for ts in lists]
    swa_fast.swag_moments_(*lists, 0.05)
    for i in range(len(sizes)):
        swa_fast.swag_moments_(*([ts[i]] for ts in one_by_one), 0.05)
    assert_equal_multi(lists[:3], one_by_one[:3])


def test_swag_moments_mixed_dtypes_in_one_call():
    pairs = MULTI_PAIRS
    sizes = [100, 65537, 1, 9, 3, 1023, 5, 17]
    mean = [make(n, avg, seed=i) for i, ((avg, _), n) in enumerate(zip(pairs, sizes))]
    variance = [m.abs() for m in mean]
    deviation = [torch.zeros_like(m) for m in mean]
    current = [make(n, cur, seed=50 + i) for i, ((_, cur), n) in enumerate(zip(pairs, sizes))]
    separate = [[t.clone() for t in ts] for ts in (mean, variance, deviation)]
    swa_fast.swag_moments_(mean, variance, deviation, current, 0.2)
    for i in range(len(sizes)):
        swa_fast.swag_moments_([separate[0][i]], [separate[1][i]], [separate[2][i]], [current[i]], 0.2)
    assert_equal_multi([mean, variance, deviation], separate)


def test_swag_moments_ring_buffer_columns():
    shapes = [(4, 3), (), (70001,), (2, 3, 4, 5)]
    mean = [helpers.make(s, torch.float32, DEVICE, i) for i, s in enumerate(shapes)]
    mean[3] = mean[3].to(memory_format=torch.channels_last)
    variance = [m.abs() for m in mean]
    total = sum(m.numel() for m in mean)
    block = torch.zeros(2 * total, device=DEVICE)
    columns, offset = [], 0
    for _ in range(2):
        column = []
        for m in mean:
            column.append(block.as_strided(m.shape, m.stride(), offset))
            offset += m.numel()
        columns.append(column)
    separate = [torch.empty_like(m) for m in mean]
    reference = [[m.clone() for m in mean], [v.clone() for v in variance]]
    for n in range(4):
        current = [helpers.make(m.shape, torch.float32, DEVICE, 30 * n + i) for i, m in enumerate(mean)]
        swa_fast.swag_moments_(mean, variance, columns[n % 2], current, 1 / (n + 1))
        swa_fast.swag_moments_(*reference, separate, current, 1 / (n + 1))
        assert_equal_multi([mean, variance, [c.contiguous() for c in columns[n % 2]]],
                           reference + [[s.contiguous() for s in separate]])


def test_swag_moments_trajectory_is_the_population_variance():
    size = 5000
    mean, variance, deviation = (torch.zeros(size, device=DEVICE) for _ in range(3))
    collected = []
    eps = torch.finfo(torch.float32).eps
    for n in range(50):
        x = make(size, torch.float32, seed=900 + n)
        collected.append(x.double())
        swa_fast.swag_moments_([mean], [variance], [deviation], [x], 1 / (n + 1))
    values = torch.stack(collected)
    truth, largest = values.var(0, unbiased=False), values.abs().max(0).values
    assert bool(((variance.double() - truth).abs() <= 10 * eps * (truth + largest * truth.sqrt())).all())
    assert bool(((deviation.double() - (x.double() - values.mean(0))).abs() <= 4 * eps * largest).all())


def test_swag_moments_skip_and_no_host_sync():
    mean, variance, deviation, current = swag_lists(torch.float32, torch.bfloat16, seed=19)
    before = [[t.clone() for t in ts] for ts in (mean, variance, deviation)]
    weight = torch.tensor(0.25, device=DEVICE)  # made before the sync check: a blocking copy
    yes, no = torch.tensor(True, device=DEVICE), torch.tensor(False, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swa_fast.swag_moments_(mean, variance, deviation, current, weight, yes)
        swa_fast.swag_moments_(mean, variance, [], current, 1.0, skip=yes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_equal_multi([mean, variance, deviation], before)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swa_fast.swag_moments_(mean, variance, deviation, current, weight, no)
        swa_fast.swag_moments_(mean, variance, deviation, current, 0.5)  # a float becomes a device tensor by a fill
        swa_fast.swag_moments_(mean, variance, [], current, weight, swa_fast.nonfinite_flag(current))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not swa_fast.nonfinite_flag(mean + variance + deviation).item()


def test_swag_moments_cuda_graph_replay_matches_eager():
    sizes = [3, 1023, 65537, 1]
    graph_lists = swag_lists(torch.float32, torch.bfloat16, sizes=sizes, seed=23)
    static_cur = graph_lists[3]
    graph_lists = graph_lists[:3]
    eager_lists = [[t.clone() for t in ts] for ts in graph_lists]
    weight = torch.tensor(1.0, device=DEVICE)

    def step(lists, cur):
        swa_fast.swag_moments_(*lists, cur, weight, swa_fast.nonfinite_flag(cur))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step([[t.clone() for t in ts] for ts in graph_lists], static_cur)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_lists, static_cur)
    for n in range(5):
        for i, c in enumerate(static_cur):
            c.copy_(make(c.numel(), c.dtype, seed=400 * (n + 1) + i))
        if n == 2:
            static_cur[2][5] = float("nan")  # skipped in the graph as in eager
        weight.fill_(1.0 / (n + 1))
        graph.replay()
        step(eager_lists, static_cur)
        torch.cuda.synchronize()
        assert_equal_multi(graph_lists, eager_lists)
    assert not swa_fast.nonfinite_flag(graph_lists[0] + graph_lists[1]).item()


@pytest.mark.parametrize("with_deviation", [True, False])
def test_opcheck_swag_moments(with_deviation):
    mean, current = _opcheck_lists()
    variance = [m.abs() for m in mean]
    deviation = [torch.zeros_like(m) for m in mean] if with_deviation else []
    for weight_dtype in (torch.float32, torch.float64):
        weight = torch.tensor(0.25, dtype=weight_dtype, device=DEVICE)
        for skip in (None, torch.tensor(False, device=DEVICE)):
            torch.library.opcheck(torch.ops.swa_fast.swag_moments_.default,
                                  (mean, variance, deviation, current, weight, skip))


# ----------------------------------------------------------------- average_stochastic_


@pytest.mark.parametrize("avg_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cur_dtype", [None, torch.float32])
@pytest.mark.parametrize("weight", [1e-3, 0.3, 0.7, 1.0])
def test_stochastic_rounding_equals_the_cpu_bitwise(avg_dtype, cur_dtype, weight):
    """The same Philox words (by pair and element, not by launch layout) and the same rounding:
    the CUDA result is the CPU's, bit for bit, across sizes around the vector width and chunks."""
    averaged = [make(n, avg_dtype, i) for i, n in enumerate(SIZES)]
    current = [make(n, cur_dtype or avg_dtype, 100 + i) for i, n in enumerate(SIZES)]
    on_cpu = [a.cpu() for a in averaged]
    counter = 2**33 + 9
    swa_fast.average_stochastic_(on_cpu, [c.cpu() for c in current], weight, torch.tensor(counter), 2**40 + 1)
    swa_fast.average_stochastic_(averaged, current, weight, torch.tensor(counter, device=DEVICE), 2**40 + 1)
    for i, (got, want) in enumerate(zip(averaged, on_cpu)):
        assert torch.equal(got.cpu(), want), f"size {SIZES[i]}"


def test_stochastic_rounding_reads_the_counter_on_the_device_and_is_unbiased():
    """A counter advanced on the device (no host value) draws new bits each update, captured in a
    CUDA graph too; and the mean of many draws of one value is that value (5 sigma, as the CPU test)."""
    n = 1 << 20
    spacing = 2.0**-7
    target = 1.0 + 0.3 * spacing
    averaged = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    current = torch.full((n,), target, device=DEVICE)
    counter = torch.zeros((), dtype=torch.long, device=DEVICE)
    weight = torch.ones((), dtype=torch.float64, device=DEVICE)
    seen = []
    for _ in range(3):
        averaged.fill_(1.0)
        swa_fast.average_stochastic_([averaged], [current], weight, counter, 5)
        seen.append(averaged.clone())
        counter.add_(1)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    sigma = spacing * (0.3 * 0.7 / n) ** 0.5
    assert abs(seen[0].double().mean().item() - target) < 5 * sigma

    graph = torch.cuda.CUDAGraph()
    counter.zero_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        swa_fast.average_stochastic_([averaged], [current], weight, counter, 5)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        swa_fast.average_stochastic_([averaged], [current], weight, counter, 5)
        counter.add_(1)
    counter.zero_()
    averaged.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(averaged, seen[0])  # counter 0, as the first eager call


def test_stochastic_rounding_mixed_call_and_many_tensors():
    """fp32 averages (average_'s launch), integer copies and more bf16 pairs than one launch holds,
    in one call: every part equals the CPU's."""
    many = 150
    averaged = [make(3 + i % 9, torch.bfloat16, i) for i in range(many)]
    averaged += [make(33, torch.float32, 500), torch.zeros(4, dtype=torch.long, device=DEVICE)]
    current = [make(3 + i % 9, torch.float32, 1000 + i) for i in range(many)]
    current += [make(33, torch.bfloat16, 501), torch.arange(4, device=DEVICE)]
    on_cpu = [a.cpu() for a in averaged]
    swa_fast.average_stochastic_(on_cpu, [c.cpu() for c in current], 0.2, torch.tensor(7), 3)
    swa_fast.average_stochastic_(averaged, current, 0.2, torch.tensor(7, device=DEVICE), 3)
    for got, want in zip(averaged, on_cpu):
        assert torch.equal(got.cpu(), want)
