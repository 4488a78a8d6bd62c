"""torch.ops.swa_fast.average_ / average_moments_ / nonfinite_flag against pure-torch references."""

import math
from fractions import Fraction

import pytest
import torch

import swa_fast

from helpers import devices, make
from reference import lerp_reference, moments_reference, torch_lerp

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 8, 17, 1023, 40_000, 100_003]  # tails, one chunk, several chunks
WEIGHTS = [1e-3, 0.25, 1 / 3, 0.5, 0.75, 0.999]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_bitwise_equal_to_torch_lerp(device, dtype, weight):
    averaged = [make(n, dtype, device, seed=i) for i, n in enumerate(SIZES)]
    current = [make(n, dtype, device, seed=100 + i) for i, n in enumerate(SIZES)]
    expected = [torch_lerp(a, c, weight) for a, c in zip(averaged, current)]
    swa_fast.average_(averaged, current, weight)
    for got, want in zip(averaged, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
def test_device_weight_tensor_matches_float_weight(device, weight_dtype):
    averaged = [make(1000, torch.float32, device, 0)]
    current = [make(1000, torch.float32, device, 1)]
    expected = torch_lerp(averaged[0], current[0], float(torch.tensor(0.3, dtype=weight_dtype)))
    swa_fast.average_(averaged, current, torch.tensor(0.3, dtype=weight_dtype, device=device))
    assert torch.equal(averaged[0], expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "avg_dtype,cur_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
        (torch.float64, torch.bfloat16),
    ],
)
def test_lower_precision_current_against_float64(device, avg_dtype, cur_dtype):
    averaged = [make(n, avg_dtype, device, i) for i, n in enumerate(SIZES)]
    current = [make(n, cur_dtype, device, 50 + i) for i, n in enumerate(SIZES)]
    for weight in (0.1, 0.7):
        expected = [lerp_reference(a, c, weight) for a, c in zip(averaged, current)]
        scale = [torch.maximum(a.double().abs(), c.double().abs()) for a, c in zip(averaged, current)]
        swa_fast.average_(averaged, current, weight)
        for got, want, size in zip(averaged, expected, scale):
            # The kernel rounds (b - a) and the fused multiply-add in the
            # averaged dtype: within two units in the last place of the inputs.
            error = (got.double() - want.double()).abs()
            assert bool((error <= 2 * torch.finfo(avg_dtype).eps * size).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_weight_one_is_an_exact_copy_even_of_inf(device, dtype):
    averaged = [make(37, dtype, device, 0)]
    current = make(37, dtype, device, 1)
    current[3] = float("inf")
    current[5] = float("-inf")
    swa_fast.average_(averaged, [current], 1.0)
    assert torch.equal(averaged[0], current)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight", [0.2, 0.6, 1.0])
def test_moments_match_two_lerps(device, dtype, weight):
    mean = [make(n, dtype, device, i) for i, n in enumerate(SIZES)]
    sq_mean = [m * m + 0.5 for m in mean]
    current = [make(n, dtype, device, 30 + i) for i, n in enumerate(SIZES)]
    expected = [moments_reference(m, s, c, weight) for m, s, c in zip(mean, sq_mean, current)]
    swa_fast.average_moments_(mean, sq_mean, current, weight)
    for m, s, (want_m, want_s) in zip(mean, sq_mean, expected):
        assert torch.equal(m, want_m)
        assert torch.equal(s, want_s)


@pytest.mark.parametrize("device", devices())
def test_moments_with_bf16_current_into_fp32(device):
    mean = [make(5000, torch.float32, device, 0)]
    sq_mean = [mean[0] * mean[0]]
    current = [make(5000, torch.bfloat16, device, 1)]
    expected = moments_reference(mean[0], sq_mean[0], current[0], 0.125)
    swa_fast.average_moments_(mean, sq_mean, current, 0.125)
    assert torch.equal(mean[0], expected[0])
    assert torch.equal(sq_mean[0], expected[1])


@pytest.mark.parametrize("device", devices())
def test_integer_and_bool_tensors_are_copied(device):
    averaged = [torch.zeros(5, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.bool, device=device)]
    current = [torch.arange(5, device=device), torch.tensor([True, False, True], device=device)]
    swa_fast.average_(averaged, current, 0.25)
    assert torch.equal(averaged[0], current[0])
    assert torch.equal(averaged[1], current[1])


@pytest.mark.parametrize("device", devices())
def test_skip_flag_leaves_everything_untouched(device):
    averaged = [make(100, torch.float32, device, 0), make(7, torch.float16, device, 1)]
    sq_mean = [a * a for a in averaged]
    current = [make(100, torch.float32, device, 2), make(7, torch.float16, device, 3)]
    before = [a.clone() for a in averaged] + [s.clone() for s in sq_mean]
    skip = torch.tensor(True, device=device)
    swa_fast.average_(averaged, current, 0.5, skip=skip)
    swa_fast.average_moments_(averaged, sq_mean, current, 0.5, skip=skip)
    for got, want in zip(averaged + sq_mean, before):
        assert torch.equal(got, want)
    swa_fast.average_(averaged, current, 0.5, skip=torch.tensor(False, device=device))
    assert torch.equal(averaged[0], torch_lerp(before[0], current[0], 0.5))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_flag_finds_any_position(device, dtype, bad):
    tensors = [make(n, dtype, device, i) for i, n in enumerate([5, 70_001, 1])] + [torch.arange(4, device=device)]
    assert not swa_fast.nonfinite_flag(tensors).item()
    for index, position in [(0, 4), (1, 0), (1, 65_537), (1, 70_000), (2, 0)]:
        poisoned = [t.clone() for t in tensors]
        poisoned[index][position] = bad
        flag = swa_fast.nonfinite_flag(poisoned)
        assert flag.dtype == torch.bool and flag.dim() == 0 and flag.device.type == device
        assert flag.item()


@pytest.mark.parametrize("device", devices())
def test_empty_lists_are_a_no_op(device):
    # Nothing to average is not an error, and the op dispatches nothing else (no kernel, no copy)...
    with torch.profiler.profile() as profile:
        assert swa_fast.average_([], [], 0.5) is None
        assert swa_fast.average_moments_([], [], [], 0.5) is None
    weight_tensor_ops = {"aten::full", "aten::empty", "aten::fill_"}
    ops = {e.name for e in profile.events() if e.name.startswith("aten::") and e.name not in weight_tensor_ops}
    assert ops == set()
    # ...but lists of different lengths still are.
    with pytest.raises(RuntimeError, match="averaged has 0 tensors but current has 1"):
        swa_fast.average_([], [make(3, torch.float32, device)], 0.5)
    with pytest.raises(RuntimeError, match="mean has 0 tensors but sq_mean has 1"):
        swa_fast.average_moments_([], [make(3, torch.float32, device)], [], 0.5)


@pytest.mark.parametrize("device", devices())
def test_many_tensors_and_mixed_dtypes_in_one_call(device):
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    averaged = [make(1 + (i * 37) % 300, dtypes[i % 4], device, i) for i in range(400)]
    current = [make(a.numel(), a.dtype, device, 1000 + i) for i, a in enumerate(averaged)]
    expected = [torch_lerp(a, c, 0.1) for a, c in zip(averaged, current)]
    swa_fast.average_(averaged, current, 0.1)
    for got, want in zip(averaged, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", devices())
def test_current_with_other_layout_is_read_correctly(device):
    averaged = make(2 * 3 * 4 * 5, torch.float32, device, 0).reshape(2, 3, 4, 5)
    current = make(2 * 3 * 4 * 5, torch.float32, device, 1).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last)
    offset_view = make(121, torch.float32, device, 2)[1:]  # storage offset, misaligned
    averaged_flat = make(120, torch.float32, device, 3)
    expected = [torch_lerp(averaged, current.contiguous(), 0.3), torch_lerp(averaged_flat, offset_view, 0.3)]
    swa_fast.average_([averaged, averaged_flat], [current, offset_view], 0.3)
    assert torch.equal(averaged, expected[0])
    assert torch.equal(averaged_flat, expected[1])


@pytest.mark.parametrize("device", devices())
def test_channels_last_averages(device):
    averaged = make(2 * 3 * 4 * 5, torch.float32, device, 0).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last)
    current = make(2 * 3 * 4 * 5, torch.float32, device, 1).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last)
    expected = torch_lerp(averaged, current, 0.6)
    swa_fast.average_([averaged], [current], 0.6)
    assert torch.equal(averaged, expected)
    assert averaged.is_contiguous(memory_format=torch.channels_last)


def copies_made(fn) -> list[str]:
    """The copy ops fn dispatches (ATen ops the kernels call show in the profiler)."""
    with torch.profiler.profile() as profile:
        fn()
    return [e.name for e in profile.events() if e.name in ("aten::copy_", "aten::empty_strided", "aten::clone")]


@pytest.mark.parametrize("device", devices())
def test_layouts_that_differ_only_in_size_one_strides_are_not_copied(device):
    # A channels_last 1x1 conv weight has strides (C, 1, C, C); its contiguous average
    # (C, 1, 1, 1). Same memory order: no copy on every update.
    weight = make(8 * 4, torch.float32, device, 0).reshape(8, 4, 1, 1).to(memory_format=torch.channels_last)
    averaged = make(8 * 4, torch.float32, device, 1).reshape(8, 4, 1, 1)
    assert weight.stride() != averaged.stride()
    expected = torch_lerp(averaged, weight.contiguous(), 0.3)
    assert copies_made(lambda: swa_fast.average_([averaged], [weight], 0.3)) == []
    assert torch.equal(averaged, expected)
    # A real difference in memory order is still copied once, and read right.
    weight = make(8 * 4 * 9, torch.float32, device, 2).reshape(8, 4, 3, 3).to(memory_format=torch.channels_last)
    averaged = make(8 * 4 * 9, torch.float32, device, 3).reshape(8, 4, 3, 3)
    expected = torch_lerp(averaged, weight.contiguous(), 0.3)
    assert "aten::copy_" in copies_made(lambda: swa_fast.average_([averaged], [weight], 0.3))
    assert torch.equal(averaged, expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_moments_square_in_fp32_without_rounding_to_half(device, dtype):
    # The documented choice: x*x stays in fp32 until the one rounding at the end.
    # In fp16, torch's sq.lerp_(x * x, w) rounds x*x first (300^2 overflows to inf).
    x = torch.tensor([300.0, 3.0, -0.1, 1e-3], device=device).to(dtype)
    mean, sq_mean = torch.zeros_like(x), torch.ones_like(x)
    swa_fast.average_moments_([mean], [sq_mean], [x], 0.25)
    x32 = x.float()
    want = torch.ones(4, device=device).lerp_(x32 * x32, 0.25).to(dtype)
    assert torch.equal(sq_mean, want)
    assert torch.isfinite(sq_mean).all()
    if dtype == torch.float16:
        assert torch.isinf(torch.ones_like(x).lerp_(x * x, 0.25)[0])  # what rounding to half first gives


def shifted_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values in a fresh storage, starting `offset` elements in (misaligned for 16-byte loads)."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_misaligned_copies_give_the_same_bits_as_aligned(device, dtype):
    sizes = [3, 17, 1023, 70_001]
    for offset in (1, 3):
        mean = [make(n, dtype, device, i) for i, n in enumerate(sizes)]
        sq = [m * m for m in mean]
        current = [make(n, dtype, device, 10 + i) for i, n in enumerate(sizes)]
        shifted = [[shifted_copy(t, offset) for t in ts] for ts in (mean, sq, current)]
        swa_fast.average_moments_(mean, sq, current, 0.3)
        swa_fast.average_moments_(*shifted, 0.3)
        for got, want in zip(shifted[0] + shifted[1], mean + sq):
            assert torch.equal(got, want), f"offset {offset}"
        assert swa_fast.nonfinite_flag(shifted[2]).item() == swa_fast.nonfinite_flag(current).item() is False


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_has_no_fused_kernel_and_is_refused_clearly(device, dtype):
    from swa_fast.ops.average import is_fusable_pair

    averaged = torch.tensor([1.0, 2.0], device=device).to(dtype)
    current = torch.tensor([3.0, 4.0], device=device).to(dtype)
    assert not is_fusable_pair(averaged, current)  # AveragedModel sends it to torch's lerp
    assert not is_fusable_pair(torch.zeros(2, device=device), current)
    before = averaged.clone()
    with pytest.raises(RuntimeError, match=r"averaged\[0\] is Float8_.*averages float16, bfloat16"):
        swa_fast.average_([averaged], [current], 0.5)
    assert torch.equal(averaged.view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("device", devices())
def test_nonfinite_flag_reads_float8_and_complex_tensors(device):
    finite = [torch.tensor([1.0, -2.0], device=device).to(dtype) for dtype in FLOAT8]
    finite.append(torch.tensor([1 + 2j, 3 - 1j], device=device))
    assert not swa_fast.nonfinite_flag(finite).item()
    for dtype in FLOAT8:
        bad = torch.tensor([1.0, float("nan")], device=device).to(dtype)
        assert swa_fast.nonfinite_flag([finite[0], bad]).item(), dtype
    for value in (complex(float("nan"), 0), complex(0, float("inf"))):
        bad = torch.tensor([1 + 1j, value], device=device)
        assert swa_fast.nonfinite_flag([bad]).item(), value
        assert swa_fast.nonfinite_flag([bad[1:]]).item()  # an offset view of a complex tensor


@pytest.mark.parametrize("device", devices())
def test_opcheck_every_op(device):
    def sample():
        return (
            [make(33, torch.float32, device, 0), make(5, torch.float64, device, 1)],
            [make(33, torch.bfloat16, device, 2), make(5, torch.float64, device, 3)],
        )

    averaged, current = sample()
    weight = torch.tensor(0.25, device=device)
    torch.library.opcheck(torch.ops.swa_fast.average_.default, (averaged, current, weight, None))
    averaged, current = sample()
    torch.library.opcheck(
        torch.ops.swa_fast.average_.default, (averaged, current, weight, torch.tensor(False, device=device))
    )
    mean, current = sample()
    sq_mean = [m * m for m in mean]
    torch.library.opcheck(torch.ops.swa_fast.average_moments_.default, (mean, sq_mean, current, weight, None))
    torch.library.opcheck(torch.ops.swa_fast.nonfinite_flag.default, (current,))


def test_ops_work_under_torch_compile():
    def step(averaged, current, weight):
        skip = torch.ops.swa_fast.nonfinite_flag(current)
        torch.ops.swa_fast.average_(averaged, current, weight, skip)
        return averaged[0].sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_avg = [make(100, torch.float32, "cpu", 0), make(10, torch.float32, "cpu", 1)]
    compiled_avg = [t.clone() for t in eager_avg]
    current = [make(100, torch.float32, "cpu", 2), make(10, torch.float32, "cpu", 3)]
    weight = torch.tensor(0.5)
    step(eager_avg, current, weight)
    compiled(compiled_avg, current, weight)
    for a, b in zip(eager_avg, compiled_avg):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# In-place semantics: version counters, leaves, inference tensors (as torch's)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_written_tensors_bump_their_version_so_autograd_notices(device):
    averaged, sq = make(4, torch.float32, device, 0), make(4, torch.float32, device, 1)
    weight = make(4, torch.float32, device, 2).requires_grad_()
    loss = (weight * averaged).sum() + (weight * sq).sum()  # both saved for backward
    versions = averaged._version, sq._version
    swa_fast.average_moments_([averaged], [sq], [make(4, torch.float32, device, 3)], 0.5)
    assert (averaged._version, sq._version) == (versions[0] + 1, versions[1] + 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # torch._foreach_lerp_ would raise the same; a stale gradient would be wrong


@pytest.mark.parametrize("device", devices())
def test_a_leaf_that_requires_grad_is_refused_under_grad_mode(device):
    leaf = make(4, torch.float32, device, 0).requires_grad_()
    before = leaf.detach().clone()
    weight = torch.tensor(0.5, device=device)
    with pytest.raises(RuntimeError, match=r"averaged\[0\] is a leaf Variable that requires grad"):
        torch.ops.swa_fast.average_([leaf], [make(4, torch.float32, device, 1)], weight, None)
    non_leaf = leaf * 2
    with pytest.raises(RuntimeError, match=r"averaged\[0\] requires grad, but the op has no derivative"):
        torch.ops.swa_fast.average_([non_leaf], [make(4, torch.float32, device, 1)], weight, None)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():  # as AveragedModel calls it: allowed
        torch.ops.swa_fast.average_([leaf], [make(4, torch.float32, device, 1)], weight, None)
    assert not torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("device", devices())
def test_inference_tensors_are_written_only_in_inference_mode(device):
    with torch.inference_mode():
        averaged = make(4, torch.float32, device, 0)
    before = averaged.clone()
    current = make(4, torch.float32, device, 1)
    with pytest.raises(RuntimeError, match=r"averaged\[0\] is an inference tensor"):
        swa_fast.average_([averaged], [current], 0.5)
    assert torch.equal(averaged, before)
    with torch.inference_mode():
        swa_fast.average_([averaged], [current], 0.5)
    assert torch.equal(averaged, torch_lerp(before, current, 0.5))


# ---------------------------------------------------------------------------
# Aliasing: refused like torch.lerp_'s "refer to a single memory location"
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_overlapping_memory_is_refused_and_nothing_is_written(device):
    base = make(12, torch.float32, device, 0)
    base[3] = 0.25  # a valid weight, read by every block while base is written
    other = make(12, torch.float32, device, 1)
    snapshot = base.clone()
    cases = [
        ("the same tensor twice in averaged", lambda: swa_fast.average_([base, base], [other, other], 0.5),
         r"averaged\[0\] and averaged\[1\] share memory"),
        ("averaged overlapping current", lambda: swa_fast.average_([base[:8]], [base[4:]], 0.5),
         r"averaged\[0\] and current\[0\] share memory"),
        ("averaged[0] is current[1]", lambda: swa_fast.average_([base, other[:6]], [other, base[:6]], 0.5),
         r"share memory"),
        ("sq_mean is mean", lambda: swa_fast.average_moments_([base], [base], [other], 0.5),
         r"mean\[0\] and sq_mean\[0\] share memory"),
        ("mean is current", lambda: swa_fast.average_moments_([base], [other.clone()], [base], 0.5),
         r"mean\[0\] and current\[0\] share memory"),
        ("the weight inside an average", lambda: torch.ops.swa_fast.average_([base], [other], base[3], None),
         r"averaged\[0\] and weight share memory"),
    ]
    for what, call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
        assert torch.equal(base, snapshot), what


@pytest.mark.parametrize("device", devices())
def test_averaging_a_tensor_with_itself_is_torchs_lerp(device):
    a = make(1000, torch.float32, device, 0)
    before = a.clone()
    swa_fast.average_([a], [a], 0.3)  # torch.lerp_(a, a, w) = a: allowed, as torch allows it
    assert torch.equal(a, torch_lerp(before, before, 0.3))


# ---------------------------------------------------------------------------
# multi_average_: K averages from one read of current
# ---------------------------------------------------------------------------

MULTI_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
    (torch.int64, torch.int64),
    (torch.bool, torch.bool),
]
# Empty, 0-dim, vector tails, several 32k-element CPU chunks.
MULTI_SHAPES = [(0,), (), (1,), (3,), (17,), (1023,), (5, 7, 3), (70_001,)]
MULTI_WEIGHTS = [0.0, 1.0, 0.5, 1e-3, 0.25, 1 / 3, 0.75, 0.999, 0.6]  # cycled to K weights


def multi_lists(k: int, avg_dtype, cur_dtype, device, shapes=MULTI_SHAPES, seed=0):
    """K lists of averages (distinct values per list) and one list of current tensors."""
    averaged = [[make(shape, avg_dtype, device, seed + 100 * j + i) for i, shape in enumerate(shapes)]
                for j in range(k)]
    current = [make(shape, cur_dtype, device, seed + 5000 + i) for i, shape in enumerate(shapes)]
    return averaged, current


def clones(lists):
    return [[t.clone() for t in ts] for ts in lists]


def separate_average_calls(averaged, current, weights, skip=None):
    """What K separate average_ calls (weights[k]: Python floats) leave, on clones."""
    expected = clones(averaged)
    for averages, weight in zip(expected, weights):
        swa_fast.average_(averages, current, weight, skip=skip)
    return expected


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes in element order: equal exactly when bitwise equal, NaNs and signed zeros included."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_lists_equal(got, want):
    assert len(got) == len(want)
    for k, (gots, wants) in enumerate(zip(got, want)):
        assert len(gots) == len(wants)
        for i, (g, w) in enumerate(zip(gots, wants)):
            assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), (k, i)
            assert torch.equal(bits(g), bits(w)), f"average {k}, tensor {i}"


def check_against_separate_calls(averaged, current, weights, weight_arg=None, skip=None):
    """multi_average_ (with weight_arg, default the weights themselves) leaves exactly what K
    average_ calls with weights[k] (and the same skip) leave."""
    expected = separate_average_calls(averaged, current, weights, skip)
    swa_fast.multi_average_(averaged, current, weights if weight_arg is None else weight_arg, skip=skip)
    assert_lists_equal(averaged, expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("avg_dtype,cur_dtype", MULTI_PAIRS)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 9])
def test_multi_average_is_bitwise_k_separate_average_calls(device, avg_dtype, cur_dtype, count):
    averaged, current = multi_lists(count, avg_dtype, cur_dtype, device, seed=count)
    weights = [MULTI_WEIGHTS[k % len(MULTI_WEIGHTS)] for k in range(count)]
    expected = separate_average_calls(averaged, current, weights)
    before = clones(averaged)
    swa_fast.multi_average_(averaged, current, weights)
    assert_lists_equal(averaged, expected)
    # And against the float64 reference (torch's own lerp, bit for bit, for same-dtype pairs).
    for k, (averages, olds) in enumerate(zip(averaged, before)):
        for got, old, cur in zip(averages, olds, current):
            if avg_dtype == cur_dtype and avg_dtype.is_floating_point and weights[k] != 1.0:
                assert torch.equal(got, torch_lerp(old, cur, weights[k]))
            want = lerp_reference(old, cur, weights[k])
            if not avg_dtype.is_floating_point or weights[k] in (0.0, 1.0):
                assert torch.equal(got, want)
            else:
                scale = torch.maximum(old.double().abs(), cur.double().abs())
                assert bool(((got.double() - want.double()).abs() <= 2 * torch.finfo(avg_dtype).eps * scale).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_average_with_one_weight_is_average_itself(device, dtype):
    for weight in WEIGHTS + [0.0, 1.0]:
        averaged, current = multi_lists(1, dtype, dtype, device, seed=3)
        expected = [t.clone() for t in averaged[0]]
        swa_fast.average_(expected, current, weight)
        swa_fast.multi_average_(averaged, current, [weight])
        assert_lists_equal(averaged, [expected])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 3, 9])
def test_multi_average_weight_tensors(device, weight_dtype, count):
    values = [MULTI_WEIGHTS[(k + 2) % len(MULTI_WEIGHTS)] for k in range(count)]
    dense = torch.tensor(values, dtype=weight_dtype, device=device)
    strided = torch.tensor([v for v in values for _ in (0, 1)], dtype=weight_dtype, device=device)[::2]
    for weights in (dense, strided):
        averaged, current = multi_lists(count, torch.float32, torch.bfloat16, device, seed=11)
        # A float32 weight converts exactly to the double each average_ call gets.
        check_against_separate_calls(averaged, current, [float(w) for w in weights.cpu()], weight_arg=weights)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_average_weight_one_is_an_exact_copy_even_of_inf(device, dtype):
    averaged, current = multi_lists(3, dtype, dtype, device, shapes=[(37,), (1025,)])
    for c in current:
        c[3], c[-2] = float("inf"), float("-inf")
    before = clones(averaged)
    swa_fast.multi_average_(averaged, current, [1.0, 0.5, 1.0])
    assert_lists_equal([averaged[0], averaged[2]], [current, current])
    assert_lists_equal([averaged[1]], [[torch_lerp(b, c, 0.5) for b, c in zip(before[1], current)]])


@pytest.mark.parametrize("device", devices())
def test_multi_average_reads_other_layouts_of_current(device):
    shape = (2, 3, 4, 5)
    n = 2 * 3 * 4 * 5
    channels_last = make(n, torch.float32, device, 1).reshape(shape).to(memory_format=torch.channels_last)
    strided = make(2 * n, torch.float32, device, 2)[::2]
    offset_view = make(n + 1, torch.bfloat16, device, 3)[1:]
    current = [channels_last, strided, offset_view]
    for averages_channels_last in (False, True):
        averaged = []
        for k in range(3):
            first = make(n, torch.float32, device, 10 + k).reshape(shape)
            if averages_channels_last:
                first = first.to(memory_format=torch.channels_last)
            averaged.append([first, make(n, torch.float32, device, 20 + k), make(n, torch.float32, device, 30 + k)])
        first_before = averaged[1][0].clone()
        check_against_separate_calls(averaged, current, [0.3, 0.8, 0.05])
        # The values do not depend on either layout.
        assert torch.equal(averaged[1][0], torch_lerp(first_before, channels_last.contiguous(), 0.8))
        assert averaged[2][0].is_contiguous(memory_format=torch.channels_last) == averages_channels_last


@pytest.mark.parametrize("device", devices())
def test_multi_average_skip_flag(device):
    averaged, current = multi_lists(3, torch.float32, torch.float32, device, shapes=[(100,), (7,)])
    averaged = [ts + [torch.zeros((), dtype=torch.long, device=device)] for ts in averaged]
    current = current + [torch.tensor(5, device=device)]
    before = clones(averaged)
    swa_fast.multi_average_(averaged, current, [0.5, 1.0, 0.25], skip=torch.tensor(True, device=device))
    assert_lists_equal(averaged, before)
    check_against_separate_calls(averaged, current, [0.5, 1.0, 0.25], skip=torch.tensor(False, device=device))
    assert all(int(ts[-1]) == 5 for ts in averaged)


@pytest.mark.parametrize("device", devices())
def test_multi_average_empty_lists_are_a_no_op(device):
    assert swa_fast.multi_average_([[], []], [], [0.5, 0.25]) is None
    assert torch.ops.swa_fast.multi_average_([], [], torch.tensor([0.5], device=device), None) is None


@pytest.mark.parametrize("device", devices())
def test_multi_average_opcheck(device):
    def sample(k):
        averaged = [[make(33, torch.float32, device, 10 * j), make(5, torch.float64, device, 10 * j + 1),
                     torch.zeros((), dtype=torch.long, device=device)] for j in range(k)]
        current = [make(33, torch.bfloat16, device, 2), make(5, torch.float64, device, 3), torch.tensor(7, device=device)]
        return [t for ts in averaged for t in ts], current

    for count, weight_dtype in [(1, torch.float32), (3, torch.float64), (9, torch.float32)]:
        weights = torch.linspace(0.1, 0.9, count, dtype=weight_dtype, device=device)
        for skip in (None, torch.tensor(False, device=device), torch.tensor(True, device=device)):
            averaged, current = sample(count)
            torch.library.opcheck(torch.ops.swa_fast.multi_average_.default, (averaged, current, weights, skip))


def multi_call(averaged, current, weights, skip=None):
    """The op itself on a flat k-major list (no Python wrapper checks in between)."""
    flat = [t for ts in averaged for t in ts]
    return lambda: torch.ops.swa_fast.multi_average_(flat, current, weights, skip)


def test_multi_average_bad_input_is_refused_with_nothing_written():
    averaged, current = multi_lists(2, torch.float32, torch.float32, "cpu", shapes=[(4, 3), (6,)])
    weights = torch.tensor([0.25, 0.5])
    wrong_shape = [averaged[0], [averaged[1][0].reshape(3, 4), averaged[1][1]]]
    wrong_dtype = [averaged[0], [averaged[1][0].double(), averaged[1][1]]]
    wrong_strides = [averaged[0], [make((3, 4), torch.float32, "cpu", 1).t(), averaged[1][1]]]
    base = make(20, torch.float32, "cpu", 9)
    base[10:12] = torch.tensor([0.25, 0.5])  # valid weights, inside averaged[0]
    cases = [
        (lambda: torch.ops.swa_fast.multi_average_([t for ts in averaged for t in ts][:3], current, weights, None),
         r"multi_average_: averaged has 3 tensors, not a multiple of the 2 weights"),
        (lambda: torch.ops.swa_fast.multi_average_([t for ts in averaged for t in ts] * 3, current,
                                                    torch.tensor([0.1, 0.2, 0.3]), None),
         r"averaged has 12 tensors \(3 weights x 4\) but current has 2"),
        (multi_call(wrong_shape, current, weights),
         r"averaged\[2\] \(average 1 of current\[0\]\) must match averaged\[0\] in shape, strides, dtype and device"),
        (multi_call(wrong_dtype, current, weights), r"averaged\[2\] \(average 1 of current\[0\]\) must match"),
        (multi_call(wrong_strides, current, weights), r"got shape \[4, 3\], strides \[1, 4\]"),
        (multi_call(averaged, current, weights.half()), r"weights must be float32 or float64, got Half"),
        (multi_call(averaged, current, torch.tensor([1, 0])), r"weights must be float32 or float64, got Long"),
        (multi_call(averaged, current, torch.tensor(0.5)), r"weights must be a 1-D tensor .*got shape \[\]"),
        (multi_call(averaged, current, weights.reshape(2, 1)), r"weights must be a 1-D tensor"),
        (multi_call(averaged, current, torch.tensor([])), r"weights is empty"),
        (multi_call(averaged, current, torch.tensor([0.5, 1.5])), r"weights\[1\] must be in \[0, 1\], got 1.5"),
        (multi_call(averaged, current, torch.tensor([float("nan"), 0.5])), r"weights\[0\] must be in \[0, 1\], got nan"),
        (multi_call(averaged, current, torch.tensor([-0.1, 0.5], dtype=torch.float64)), r"weights\[0\] must be in"),
        (multi_call(averaged, current, torch.tensor([0.5, 0.5], device="meta")),
         r"weights is on meta but the averaged tensors are on cpu"),
        (multi_call(averaged, current, weights, torch.tensor(1.0)), r"skip must be a 0-dim bool tensor"),
        # Overlapping memory: no exception for an average that is its current tensor.
        (multi_call([[current[0], averaged[0][1]], averaged[1]], current, weights),
         r"averaged\[0\] and current\[0\] share memory"),
        (multi_call([averaged[0], [averaged[0][0], averaged[1][1]]], current, weights),
         r"averaged\[0\] and averaged\[2\] share memory"),
        (multi_call([[base[:12].view(4, 3), base[12:18]], averaged[1]], current, base[10:12]),
         r"averaged\[0\] and weights share memory"),
        (multi_call([[base[:12].view(4, 3), base[12:18]], averaged[1]], [base[6:18].view(4, 3), current[1]], weights),
         r"share memory"),
    ]
    for call, message in cases:
        snapshot = clones(averaged) + [[base.clone()]]
        with pytest.raises(RuntimeError, match=message):
            call()
        assert_lists_equal(averaged + [[base]], snapshot)


def test_multi_average_python_wrapper_checks():
    averaged, current = multi_lists(2, torch.float32, torch.float32, "cpu", shapes=[(4,), (6,)])
    before = clones(averaged)
    with pytest.raises(ValueError, match=r"multi_average_: averaged\[1\] has 1 tensors but current has 2"):
        swa_fast.multi_average_([averaged[0], averaged[1][:1]], current, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"multi_average_: 2 lists of averages but 3 weights"):
        swa_fast.multi_average_(averaged, current, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"multi_average_: 2 lists of averages but 1 weights"):
        swa_fast.multi_average_(averaged, current, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"weights\[1\] must be in \[0, 1\], got 2.0"):
        swa_fast.multi_average_(averaged, current, [0.5, 2.0])
    with pytest.raises(ValueError, match=r"weights\[0\] must be in \[0, 1\], got nan"):
        swa_fast.multi_average_(averaged, current, [float("nan"), 0.5])
    assert_lists_equal(averaged, before)


@pytest.mark.parametrize("dtype", [torch.complex64, *FLOAT8])
def test_multi_average_refuses_complex_and_float8(dtype):
    averaged = [[torch.tensor([1.0, 2.0]).to(dtype)] for _ in range(2)]
    current = [torch.tensor([3.0, 4.0]).to(dtype)]
    message = r"averaged\[0\] is complex" if dtype.is_complex else r"averaged\[0\] is Float8_.*averages float16, bfloat16"
    with pytest.raises(RuntimeError, match=message):
        swa_fast.multi_average_(averaged, current, [0.5, 0.5])


def test_multi_average_in_place_rules():
    averaged, current = multi_lists(3, torch.float32, torch.float32, "cpu", shapes=[(4,), (2,)])
    versions = [[t._version for t in ts] for ts in averaged]
    swa_fast.multi_average_(averaged, current, [0.5, 0.25, 1.0])
    assert [[t._version for t in ts] for ts in averaged] == [[v + 1 for v in vs] for vs in versions]
    assert all(c._version == 0 for c in current)
    # A leaf that requires grad, in any list, is refused under grad mode (the wrapper's no_grad allows it).
    leaf = make(2, torch.float32, "cpu", 7).requires_grad_()
    flat = [averaged[0][0], averaged[0][1], averaged[1][0], leaf]
    with pytest.raises(RuntimeError, match=r"multi_average_: averaged\[3\] is a leaf Variable that requires grad"):
        torch.ops.swa_fast.multi_average_(flat, current, torch.tensor([0.5, 0.5]), None)
    before = leaf.detach().clone()
    swa_fast.multi_average_([averaged[0], [averaged[1][0], leaf]], current, [0.5, 0.5])
    assert torch.equal(leaf.detach(), torch_lerp(before, current[1], 0.5))


# ---------------------------------------------------------------------------
# swag_moments_: SWAG's mean (average_'s lerp), centred variance and deviation
# ---------------------------------------------------------------------------

SWAG_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
]
# 0-dim, empty, around the vector widths (4 and 8 lanes), the 512-element conversion
# blocks, the 32k-element CPU chunks, and several chunks with a ragged end.
SWAG_SHAPES = [(), (0,), (1,), (3,), (7,), (8,), (9,), (17,), (511,), (513,), (5, 7, 3), (32_767,), (32_769,),
               (70_001,)]
SWAG_WEIGHTS = [1e-3, 0.25, 1 / 3, 0.5, 0.75, 0.999, 1.0]


def opmath_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def swag_reference(mean, variance, current, weight):
    """The formulas of swag_moments_ in float64, unrounded: (mean, variance, deviation). The weight is
    the one the kernel computes with (rounded to the arithmetic type); w == 1 copies x into the mean."""
    w = float(torch.tensor(weight, dtype=opmath_of(mean.dtype)))
    m, v, x = (t.double() for t in (mean, variance, current))
    d = x - m
    new_mean = x.clone() if weight == 1.0 else m + w * d
    return new_mean, (1 - w) * (v + w * d * d), x - new_mean


def swag_lists(avg_dtype, cur_dtype, device, shapes=SWAG_SHAPES, seed=0):
    """mean, variance (>= 0), deviation (garbage, to be overwritten) and current lists."""
    mean = [make(s, avg_dtype, device, seed + i) for i, s in enumerate(shapes)]
    variance = [make(s, avg_dtype, device, seed + 100 + i).abs() for i, s in enumerate(shapes)]
    deviation = [make(s, avg_dtype, device, seed + 200 + i) for i, s in enumerate(shapes)]
    current = [make(s, cur_dtype, device, seed + 300 + i) for i, s in enumerate(shapes)]
    return mean, variance, deviation, current


def assert_swag_close(got, old, current, weight):
    """got = (mean, variance, deviation) after one step from old = (mean, variance) against the
    float64 formulas: each operation rounds once in the arithmetic type, each result once more to the
    averages' dtype, so the errors are a few units in the last place of the operands' scale."""
    mean, variance, deviation = got
    ref_mean, ref_var, ref_dev = swag_reference(old[0], old[1], current, weight)
    eps_t = torch.finfo(opmath_of(mean.dtype)).eps
    eps_s = torch.finfo(mean.dtype).eps
    scale = torch.maximum(old[0].double().abs(), current.double().abs())
    spacing = torch.finfo(mean.dtype).tiny * eps_s  # of subnormals (fp16: results near 0)
    assert bool(((mean.double() - ref_mean).abs() <= 2 * eps_t * scale + eps_s * ref_mean.abs() + spacing).all())
    # Every term of the variance is >= 0: a relative bound (d, w*d, the fma, the product: 4 roundings,
    # d counted twice), plus the rounding to the storage dtype.
    assert bool(((variance.double() - ref_var).abs() <= 6 * eps_t * ref_var + eps_s * ref_var + spacing).all())
    assert bool((variance >= 0).all())
    if deviation is not None:
        assert bool(((deviation.double() - ref_dev).abs() <= 3 * eps_t * scale + eps_s * ref_dev.abs() + spacing).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("avg_dtype,cur_dtype", SWAG_PAIRS)
@pytest.mark.parametrize("weight", SWAG_WEIGHTS)
def test_swag_moments_against_float64_and_average_(device, avg_dtype, cur_dtype, weight):
    mean, variance, deviation, current = swag_lists(avg_dtype, cur_dtype, device)
    old = [(m.clone(), v.clone()) for m, v in zip(mean, variance)]
    # The mean is bitwise what average_ gives on the same inputs (the same lerp code).
    expected_mean = [m.clone() for m in mean]
    swa_fast.average_(expected_mean, current, weight)
    # Without deviation: the same mean and variance, bit for bit.
    diagonal = [[m.clone() for m in mean], [v.clone() for v in variance]]
    swa_fast.swag_moments_(mean, variance, deviation, current, weight)
    swa_fast.swag_moments_(diagonal[0], diagonal[1], [], current, weight)
    assert_lists_equal([mean, diagonal[0], diagonal[1]], [expected_mean, mean, variance])
    for m, v, e, (old_m, old_v), x in zip(mean, variance, deviation, old, current):
        assert m.dtype == v.dtype == e.dtype == avg_dtype
        assert_swag_close((m, v, e), (old_m, old_v), x, weight)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_swag_moments_first_collection_resets(device, dtype):
    # w == 1: mean = x exactly (average_'s copy), variance = 0 and deviation = 0 for finite values.
    mean, variance, deviation, current = swag_lists(dtype, dtype, device, shapes=[(37,), (1025,)], seed=4)
    swa_fast.swag_moments_(mean, variance, deviation, current, 1.0)
    zeros = [torch.zeros_like(c) for c in current]
    assert_lists_equal([mean, variance, deviation], [current, zeros, zeros])


@pytest.mark.parametrize("device", devices())
def test_swag_moments_layouts(device):
    shape = (2, 3, 4, 5)
    n = 2 * 3 * 4 * 5

    def run(layout_mean, current):
        mean = make(n, torch.float32, device, 1).reshape(shape)
        variance = make(n, torch.float32, device, 2).abs().reshape(shape)
        if layout_mean == "channels_last":
            mean, variance = (t.to(memory_format=torch.channels_last) for t in (mean, variance))
        elif layout_mean == "transposed":  # dense, not contiguous
            mean, variance = (t.transpose(1, 3).contiguous().transpose(1, 3) for t in (mean, variance))
        deviation = torch.empty_like(mean)
        assert deviation.stride() == mean.stride()
        old = mean.clone(), variance.clone()
        swa_fast.swag_moments_([mean], [variance], [deviation], [current], 0.3)
        assert_swag_close((mean, variance, deviation), old, current, 0.3)
        assert mean.stride() == variance.stride() == deviation.stride()
        return mean.contiguous(), variance.contiguous(), deviation.contiguous()

    contiguous = make(n, torch.float32, device, 3).reshape(shape)
    currents = [
        contiguous,
        contiguous.to(memory_format=torch.channels_last),
        make(2 * n, torch.float32, device, 3)[::2].reshape(shape),  # not dense: copied once
        make(n + 1, torch.float32, device, 4)[1:].reshape(shape),  # storage offset, misaligned
        contiguous.to(torch.bfloat16).to(memory_format=torch.channels_last),
    ]
    for layout in ("contiguous", "channels_last", "transposed"):
        results = [run(layout, c) for c in currents[:2]]
        assert all(torch.equal(a, b) for a, b in zip(*results))  # the values do not depend on the layouts
        for c in currents[2:]:
            run(layout, c)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swag_moments_trajectory_is_the_population_variance(device, dtype):
    # 50 collections with w = 1/(n+1) (the first weight 1): the mean is average_'s SWA mean bit for
    # bit, the variance the population variance of the collected values, the deviation x_n - mean_n.
    size = 1000
    mean, variance, deviation = (torch.zeros(size, dtype=dtype, device=device) for _ in range(3))
    swa_mean = torch.zeros(size, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    collected = []
    for n in range(50):
        x = make(size, dtype, device, 1000 + n)
        collected.append(x.double())
        swa_fast.swag_moments_([mean], [variance], [deviation], [x], 1 / (n + 1))
        swa_fast.average_([swa_mean], [x], 1 / (n + 1))
        assert torch.equal(bits(mean), bits(swa_mean))
        values = torch.stack(collected)
        truth, truth_mean = values.var(0, unbiased=False), values.mean(0)
        largest = values.abs().max(0).values
        # Rounding errors of the running mean reach the variance through d: relative to
        # |x| * sqrt(var), not var alone (a tiny spread after two close values).
        bound = 10 * eps * (truth + largest * truth.sqrt())
        assert bool(((variance.double() - truth).abs() <= bound).all()), n
        assert bool(((deviation.double() - (x.double() - truth_mean)).abs() <= 4 * eps * largest).all()), n


@pytest.mark.parametrize("spread,worst", [(1e-2, 0.05), (1e-3, 0.15)])
def test_swag_moments_centred_variance_survives_a_large_mean(spread, worst):
    # fp32 weights 1000 + spread * randn: the centred recurrence keeps the variance within a few
    # percent of the float64 truth (of the fp32 values collected), while E[x^2] - E[x]^2 from
    # average_moments_'s fp32 moments loses it to cancellation (ulp(1e6) = 0.0625 >> spread^2).
    # At spread 1e-3 the fp32 mean itself (ulp(1000) = 6e-5) is off by up to a quarter of the
    # spread, which bounds any fp32 running estimate; the median stays within a percent.
    size = 4096
    mean, variance, deviation, moment_mean, sq_mean = (torch.zeros(size) for _ in range(5))
    collected = []
    for n in range(50):
        x = (1000 + spread * make(size, torch.float64, "cpu", 2000 + n)).float()
        collected.append(x.double())
        swa_fast.swag_moments_([mean], [variance], [deviation], [x], 1 / (n + 1))
        swa_fast.average_moments_([moment_mean], [sq_mean], [x], 1 / (n + 1))
    truth = torch.stack(collected).var(0, unbiased=False)
    centred = (variance.double() - truth).abs() / truth
    cancelled = (sq_mean.double() - moment_mean.double() ** 2 - truth).abs() / truth
    assert centred.max() < worst and centred.median() < 0.01
    assert cancelled.median() > 100  # orders of magnitude off: why the op is centred


@pytest.mark.parametrize("device", devices())
def test_swag_moments_skip_and_empty_lists(device):
    mean, variance, deviation, current = swag_lists(torch.float32, torch.bfloat16, device, shapes=[(100,), (7,)])
    before = clones([mean, variance, deviation])
    swa_fast.swag_moments_(mean, variance, deviation, current, 0.5, torch.tensor(True, device=device))
    swa_fast.swag_moments_(mean, variance, [], current, 1.0, skip=torch.tensor(True, device=device))
    assert_lists_equal([mean, variance, deviation], before)
    swa_fast.swag_moments_(mean, variance, deviation, current, 0.5, skip=torch.tensor(False, device=device))
    for m, v, e, old_m, old_v, x in zip(mean, variance, deviation, before[0], before[1], current):
        assert_swag_close((m, v, e), (old_m, old_v), x, 0.5)
    assert swa_fast.swag_moments_([], [], [], [], 0.5) is None
    assert swa_fast.swag_moments_([], [], None, [], 0.5) is None


def ring_columns(mean, columns, device):
    """SWAG's deviation ring buffer: one block, and per column the views
    block.as_strided(mean[i].shape, mean[i].stride(), offset), non-overlapping, sharing the storage."""
    total = sum(m.numel() for m in mean)
    block = torch.full((columns * total,), float("nan"), dtype=mean[0].dtype, device=device)
    views, offset = [], 0
    for _ in range(columns):
        column = []
        for m in mean:
            column.append(block.as_strided(m.shape, m.stride(), offset))
            offset += m.numel()
        views.append(column)
    return block, views


@pytest.mark.parametrize("device", devices())
def test_swag_moments_writes_ring_buffer_columns(device):
    shapes = [(4, 3), (), (1000,), (2, 3, 4, 5)]
    mean, variance, _, _ = swag_lists(torch.float32, torch.float32, device, shapes=shapes, seed=7)
    mean[3] = mean[3].to(memory_format=torch.channels_last)
    variance[3] = variance[3].to(memory_format=torch.channels_last)
    block, columns = ring_columns(mean, 3, device)
    separate = [torch.empty_like(m) for m in mean]
    reference = clones([mean, variance])
    for n in range(5):
        current = [make(m.shape, torch.float32, device, 50 * n + i) for i, m in enumerate(mean)]
        swa_fast.swag_moments_(mean, variance, columns[n % 3], current, 1 / (n + 1))
        swa_fast.swag_moments_(reference[0], reference[1], separate, current, 1 / (n + 1))
        assert_lists_equal([mean, variance, [c.contiguous() for c in columns[n % 3]]],
                           reference + [[s.contiguous() for s in separate]])
        assert torch.isnan(block).sum() == max(0, 2 - n) * block.numel() // 3  # columns not yet written
    assert all(c.stride() == m.stride() for c, m in zip(columns[0], mean))


@pytest.mark.parametrize("device", devices())
def test_swag_moments_in_place_rules(device):
    mean, variance, deviation, current = swag_lists(torch.float32, torch.float32, device, shapes=[(4,), (2,)])
    versions = [[t._version for t in ts] for ts in (mean, variance, deviation)]
    swa_fast.swag_moments_(mean, variance, deviation, current, 0.5)
    assert [[t._version for t in ts] for ts in (mean, variance, deviation)] == [[v + 1 for v in vs] for vs in versions]
    assert all(c._version == 0 for c in current)
    weight = torch.tensor(0.5, device=device)
    for name, index in (("mean", 0), ("variance", 1), ("deviation", 2)):
        lists = [list(mean), list(variance), list(deviation)]
        leaf = make(2, torch.float32, device, 9).abs().requires_grad_()
        lists[index][1] = leaf
        before = leaf.detach().clone()
        with pytest.raises(RuntimeError, match=rf"swag_moments_: {name}\[1\] is a leaf Variable that requires grad"):
            torch.ops.swa_fast.swag_moments_(*lists, current, weight, None)
        assert torch.equal(leaf.detach(), before)
        swa_fast.swag_moments_(*lists, current, weight)  # the wrapper runs under no_grad: allowed
    # A saved tensor modified in place: autograd notices.
    w = make(4, torch.float32, device, 3).requires_grad_()
    loss = (w * deviation[0]).sum()
    swa_fast.swag_moments_(mean, variance, deviation, current, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", devices())
def test_swag_moments_refuses_overlapping_memory(device):
    mean, variance, deviation, current = swag_lists(torch.float32, torch.float32, device, shapes=[(12,), (6,)])
    block = make(40, torch.float32, device, 11)
    block[39] = 0.25  # a valid weight inside a written tensor
    cases = [
        ("deviation is mean", (mean, variance, [mean[0], deviation[1]], current),
         r"mean\[0\] and deviation\[0\] share memory"),
        ("variance is mean", (mean, [variance[0], mean[1]], deviation, current),
         r"mean\[1\] and variance\[1\] share memory"),
        ("two deviation views overlap",
         (mean, variance, [block.as_strided((12,), (1,), 0), block.as_strided((6,), (1,), 8)], current),
         r"deviation\[0\] and deviation\[1\] share memory"),
        ("deviation overlaps current",
         (mean, variance, [block.as_strided((12,), (1,), 0), deviation[1]],
          [current[0], block.as_strided((6,), (1,), 11)]),
         r"deviation\[0\] and current\[1\] share memory"),
        ("mean is current", (mean, variance, deviation, [mean[0], current[1]]),
         r"mean\[0\] and current\[0\] share memory"),
        ("the weight inside the variance", (mean, [variance[0], block[34:40]], deviation, current),
         r"variance\[1\] and weight share memory"),
    ]
    for what, args, message in cases:
        snapshot = clones([mean, variance, deviation, current, [block]])
        weight = block[39] if what.startswith("the weight") else torch.tensor(0.25, device=device)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.swa_fast.swag_moments_(*(list(a) for a in args), weight, None)
        assert_lists_equal([mean, variance, deviation, current, [block]], snapshot)
    # Distinct views of one storage (ring columns) are not an overlap.
    torch.ops.swa_fast.swag_moments_(
        mean, variance, [block.as_strided((12,), (1,), 0), block.as_strided((6,), (1,), 12)], current,
        torch.tensor(0.25, device=device), None)


@pytest.mark.parametrize("device", devices())
def test_swag_moments_opcheck(device):
    def sample(with_deviation):
        mean = [make(33, torch.float32, device, 0), make(5, torch.float64, device, 1),
                make((2, 3), torch.float16, device, 2)]
        variance = [m.abs() for m in mean]
        deviation = [torch.zeros_like(m) for m in mean] if with_deviation else []
        current = [make(33, torch.bfloat16, device, 3), make(5, torch.float64, device, 4),
                   make((2, 3), torch.float16, device, 5)]
        return mean, variance, deviation, current

    for with_deviation in (True, False):
        for weight_dtype in (torch.float32, torch.float64):
            weight = torch.tensor(0.25, dtype=weight_dtype, device=device)
            for skip in (None, torch.tensor(False, device=device), torch.tensor(True, device=device)):
                torch.library.opcheck(torch.ops.swa_fast.swag_moments_.default,
                                      (*sample(with_deviation), weight, skip))


def test_swag_moments_is_independent_of_the_thread_count():
    shapes = [(300_000,), (70_001,), (5,), (2, 3, 4, 5)]  # enough elements for several threads
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            mean, variance, deviation, current = swag_lists(torch.float32, torch.bfloat16, "cpu", shapes=shapes)
            swa_fast.swag_moments_(mean, variance, deviation, current, 0.3)
            results.append([mean, variance, deviation])
    finally:
        torch.set_num_threads(threads)
    assert_lists_equal(results[0], results[1])


def round_to_float32(q: Fraction) -> float:
    """The float32 nearest to the exact rational q (ties to even): one correct rounding, as a float32
    operation (or fma) gives, without the double rounding of going through float64."""
    if q == 0:
        return 0.0
    a = abs(q)
    exponent = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** exponent > a:
        exponent -= 1
    ulp = Fraction(2) ** (max(exponent, -126) - 23)  # subnormals below 2^-126
    units = a / ulp
    whole = math.floor(units)
    rest = units - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    return math.copysign(float(whole * ulp), q)


def swag_as_written_float32(m: float, v: float, x: float, weight: float) -> tuple:
    """One element of swag_moments_ with float32 arithmetic, every operation rounded once, exactly
    as the schema comment writes it (the lerp as average_'s: fma(w, d, m) or fma(w - 1, d, x))."""
    f = Fraction
    w = round_to_float32(f(weight))
    d = round_to_float32(f(x) - f(m))
    if weight == 1.0:
        mean = x
    elif abs(w) < 0.5:
        mean = round_to_float32(f(w) * f(d) + f(m))
    else:
        mean = round_to_float32(f(w - 1) * f(d) + f(x))
    t = round_to_float32(f(w) * f(d))
    variance = round_to_float32(f(round_to_float32(1 - f(w))) * f(round_to_float32(f(t) * f(d) + f(v))))
    return mean, variance, round_to_float32(f(x) - f(mean))


@pytest.mark.skipif(swa_fast.BUILD_INFO["cpu_capability"] != "avx2",
                    reason="a default-ISA build rounds the multiply-adds without fma")
@pytest.mark.parametrize("avg_dtype,cur_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_swag_moments_rounds_exactly_as_written(avg_dtype, cur_dtype):
    # Bitwise against an exact emulation of the fp32 arithmetic (each operation one rounding, the
    # fma one), tails included: the kernel computes the formulas as written, nothing fused more or less.
    size = 203
    for weight in (1e-3, 1 / 7, 0.5, 0.8, 1.0):
        mean, variance, deviation, current = swag_lists(avg_dtype, cur_dtype, "cpu", shapes=[(size,)], seed=5)
        mean[0][:50] += 100  # large means: d loses bits to cancellation, as in real weights
        old = [t[0].float().tolist() for t in (mean, variance, current)]
        swa_fast.swag_moments_(mean, variance, deviation, current, weight)
        emulated = [swag_as_written_float32(m, v, x, weight) for m, v, x in zip(*old)]
        for got, want in zip((mean[0], variance[0], deviation[0]), zip(*emulated)):
            assert torch.equal(bits(got), bits(torch.tensor(want, dtype=torch.float32).to(avg_dtype))), weight
