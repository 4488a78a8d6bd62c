"""average_stochastic_: average_ with stochastic rounding of float16/bfloat16 averages.

Against an independent emulation (Philox4x32-10 in numpy, the neighbours found from the bits,
the float32 lerp from torch.lerp), bitwise; unbiasedness as a statistical test with a stated
false-failure rate; reproducibility (seed, counter, thread count); float32/float64 averages
bitwise average_'s; edge values; an EMA with steps far below bf16's spacing; bad input; opcheck.
"""

import math

import numpy as np
import pytest
import torch

import swa_fast
from swa_fast import average_, average_stochastic_

from helpers import devices

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 over numpy uint64 arrays holding 32-bit values (Salmon et al. 2011)."""
    c = [np.asarray(v, dtype=np.uint64) & MASK32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & MASK32, np.uint64(k1) & MASK32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return np.stack(c)


def element_words(seed, counter, stream, numel, first=0):
    """The 32-bit words of elements first .. first + numel - 1 of one tensor (stochastic_rounding.h:
    element j takes word j % 4 of the Philox call for group j // 4)."""
    j = np.arange(first, first + numel, dtype=np.uint64)
    group = j >> np.uint64(2)
    seed &= (1 << 64) - 1
    counter &= (1 << 64) - 1
    words = philox4x32_10(group & MASK32, group >> np.uint64(32), np.full(numel, stream, dtype=np.uint64),
                          np.full(numel, counter & 0xFFFFFFFF, dtype=np.uint64), seed & 0xFFFFFFFF,
                          (seed >> 32) ^ (counter >> 32))
    return words[(j & np.uint64(3)).astype(np.int64), np.arange(numel)]


def neighbours(r: torch.Tensor, dtype):
    """(lo, hi): the adjacent values of ``dtype`` around each float32 value (r itself when exact)."""
    nearest = r.to(dtype)
    bits = nearest.view(torch.int16).to(torch.int32) & 0xFFFF
    up = r > nearest.float()
    negative = (bits & 0x8000) != 0
    zero = (bits & 0x7FFF) == 0
    away = up != negative
    stepped = torch.where(away, bits + 1, bits - 1)
    stepped = torch.where(zero, torch.where(up, torch.tensor(0x0001), torch.tensor(0x8001)), stepped)
    other = (stepped & 0xFFFF).to(torch.int32).to(torch.int16).view(dtype)
    exact = nearest.float() == r
    near, far = nearest.float(), torch.where(exact, nearest.float(), other.float())
    lo, hi = torch.minimum(near, far), torch.maximum(near, far)
    return lo, hi, exact


def emulate(avg, cur, weight, seed, counter, stream=0):
    """What average_stochastic_ writes into the fp16/bf16 tensor ``avg``."""
    w = torch.tensor(weight, dtype=torch.float32)
    r = cur.float() if weight == 1.0 else torch.lerp(avg.float(), cur.float(), w)
    lo, hi, exact = neighbours(r, avg.dtype)
    words = torch.from_numpy(element_words(seed, counter, stream, r.numel()).astype(np.int64)).view(r.shape)
    u = (words >> 8).to(torch.float32) * 2.0**-24
    p = (r - lo) / (hi - lo)
    rounded = torch.where(u < p, hi, lo)
    finite = torch.isfinite(r)
    # A finite r beyond the largest finite value rounds to that value, whatever its sign.
    largest = torch.finfo(avg.dtype).max
    rounded = torch.where(torch.isinf(rounded) & finite, torch.sign(r) * largest, rounded)
    return torch.where(exact | ~finite, r.to(avg.dtype).float(), rounded).to(avg.dtype)


def counter(value, device="cpu"):
    return torch.tensor(value, dtype=torch.long, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cur_dtype", [None, torch.float32])
@pytest.mark.parametrize("weight", [1e-3, 0.3, 0.7, 1.0])
def test_equals_the_emulation_bitwise(dtype, cur_dtype, weight):
    generator = torch.Generator().manual_seed(3)
    shapes = [(1000,), (7, 13), (3,), (0,), (4099,)]
    averaged = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    current = [(torch.randn(s, generator=generator) * 1.5).to(cur_dtype or dtype) for s in shapes]
    expected = [emulate(a, c, weight, seed=2**40 + 17, counter=2**33 + 5, stream=i)
                for i, (a, c) in enumerate(zip(averaged, current))]
    average_stochastic_(averaged, current, weight, counter(2**33 + 5), 2**40 + 17)
    for i, (a, e) in enumerate(zip(averaged, expected)):
        assert torch.equal(a.view(torch.int16), e.view(torch.int16)), f"tensor {i}"


PHILOX_PATHS = [pytest.param(False, id="portable"),
                pytest.param(True, id="simd", marks=pytest.mark.skipif(
                    not swa_fast._C.has_simd_philox, reason="this build has no SIMD Philox"))]


@pytest.mark.parametrize("simd", PHILOX_PATHS)
@pytest.mark.parametrize("first, count", [
    (0, 512), (0, 1), (0, 37), (3, 509), (1, 1500), (4 * 16 - 1, 2 + 4 * 16),  # starts inside a group, tails
    (4 * (2**32 - 5), 64),  # the group index crosses 2^32 inside one set of lanes: its high word changes
])
def test_cpu_words_equal_the_emulation(simd, first, count):
    """The CPU kernel's block words, from each Philox path it has (the AVX2 one runs only in AVX2
    builds, the portable one on the last groups of a block and in other builds)."""
    for seed, count_value, stream in [(0, 0, 0), (2**40 + 17, 2**33 + 5, 3), (2**64 - 1, 2**63 - 1, 2**31 - 1)]:
        words = swa_fast._C.stochastic_words(seed, count_value, stream, first, count, simd)
        expected = element_words(seed, count_value, stream, count, first=first)
        assert np.array_equal(np.asarray(words, dtype=np.uint64), expected), (seed, count_value, stream)


def hostile_values(dtype):
    """float32 values at every edge of a 16-bit rounding: exact values, both zeros, the smallest
    subnormals and what lies below them (for float16, below 2^-25 too), the largest finite values
    and beyond, halfway points, Inf and NaN, each with both signs."""
    info = torch.finfo(dtype)
    tiny_sub = info.smallest_normal * 2.0**-(7 if dtype == torch.bfloat16 else 10)  # smallest subnormal
    magnitudes = [0.0, 1.0, 1.0 + 2**-20, 3.0e-3, tiny_sub, tiny_sub * 0.3, tiny_sub * 1.5, tiny_sub * 2**-3,
                  tiny_sub * 2**-20, 1e-45, info.smallest_normal, info.smallest_normal * (1 - 2**-12),
                  info.max, info.max * (1 + 2**-12), info.max * 1.004, 3.4e38, 1.0 + 2**-8, 1.0 + 2**-11,
                  float("inf"), float("nan")]
    values = torch.tensor([m for m in magnitudes] + [-m for m in magnitudes], dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    # Repeated with random scalings within the spacing, in a length that is no multiple of a SIMD width.
    noise = 1 + torch.rand(values.numel() * 41, generator=generator) * 2**-9
    return values.repeat(41) * noise


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hostile_values_equal_the_emulation_bitwise(dtype):
    r = hostile_values(dtype)
    a = torch.zeros(r.numel(), dtype=dtype)
    expected = emulate(a, r, 1.0, seed=11, counter=4)
    average_stochastic_([a], [r], 1.0, counter(4), 11)
    nan = torch.isnan(r)
    assert bool(torch.isnan(a.float())[nan].all())
    assert torch.equal(a.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert bool(torch.isfinite(a.float())[torch.isfinite(r)].all())  # beyond the largest: rounded to it


def test_every_result_is_a_neighbour_of_the_float32_lerp():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50_000, generator=generator).bfloat16()
    x = torch.randn(50_000, generator=generator)
    r = torch.lerp(a.float(), x, torch.tensor(0.05))
    lo, hi, _ = neighbours(r, torch.bfloat16)
    average_stochastic_([a], [x], 0.05, counter(0), 9)
    assert bool(((a.float() == lo) | (a.float() == hi)).all())
    assert 0 < int((a.float() == hi).sum()) < a.numel()  # both neighbours occur


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unbiased(dtype):
    """Many draws of one value r = lo + p * (hi - lo): the mean of the rounded values is r.

    Each draw is lo or hi, so the mean of N draws has standard deviation
    (hi - lo) * sqrt(p (1 - p) / N). The test allows 5 of them: a correct kernel fails with
    probability about 6e-7 (two-sided normal tail), and a biased rounding (say, round to nearest,
    off by 0.3 of the spacing here) fails for sure.
    """
    n = 400_000
    base = torch.tensor(1.0, dtype=dtype)
    spacing = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    target = 1.0 + 0.3 * spacing  # p = 0.3, exactly representable in float32
    a = torch.full((n,), 1.0, dtype=dtype)
    x = torch.full((n,), target)
    average_stochastic_([a], [x], 1.0, counter(11), 123)  # weight 1: r = target for every element
    mean = a.double().mean().item()
    sigma = spacing * math.sqrt(0.3 * 0.7 / n)
    assert abs(mean - target) < 5 * sigma, (mean, target, sigma)
    assert base.item() == 1.0


def test_reproducible_and_independent_of_threads_counter_and_seed():
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(100_003, generator=generator).bfloat16()
    x = torch.randn(100_003, generator=generator)

    def run(seed, count, threads=None):
        a = start.clone()
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            average_stochastic_([a], [x], 0.01, counter(count), seed)
        finally:
            torch.set_num_threads(previous)
        return a

    reference = run(5, 0)
    assert torch.equal(reference, run(5, 0))
    assert torch.equal(reference, run(5, 0, threads=1))
    assert not torch.equal(reference, run(5, 1))
    assert not torch.equal(reference, run(6, 0))
    assert not torch.equal(reference, run(5 + 2**32, 0))  # the seed's high word counts too
    assert not torch.equal(reference, run(5, 2**32))  # and the counter's


def test_float32_and_float64_averages_and_copies_are_average_s():
    generator = torch.Generator().manual_seed(2)
    averaged = [torch.randn(300, generator=generator), torch.randn(40, generator=generator, dtype=torch.float64),
                torch.randn(50, generator=generator), torch.zeros(3, dtype=torch.long)]
    current = [torch.randn(300, generator=generator).bfloat16(), torch.randn(40, generator=generator,
                                                                            dtype=torch.float64),
               torch.randn(50, generator=generator), torch.tensor([4, 5, 6])]
    expected = [a.clone() for a in averaged]
    average_(expected, current, 0.25)
    average_stochastic_(averaged, current, 0.25, counter(3), 1)
    for a, e in zip(averaged, expected):
        assert torch.equal(a, e)


def test_exact_values_and_non_finite_values_are_kept():
    a = torch.tensor([1.0, -2.0, 0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, 1.0],
                     dtype=torch.bfloat16)
    x = torch.tensor([1.0, -2.0, 0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1.0 + 2**-20])
    average_stochastic_([a], [x], 1.0, counter(0), 0)
    assert a[:3].tolist() == [1.0, -2.0, 0.0]
    assert a[3] == float("inf") and a[4] == float("-inf") and torch.isnan(a[5])
    assert torch.isfinite(a[6])  # beyond bf16's largest finite value: that value, not Inf
    assert a[6].item() == torch.finfo(torch.bfloat16).max
    b = torch.zeros(64, dtype=torch.bfloat16)  # and of either sign, for any word
    average_stochastic_([b], [torch.full((64,), -3.4e38)], 1.0, counter(0), 0)
    assert bool((b.float() == -torch.finfo(torch.bfloat16).max).all())
    assert a[7].item() in (1.0, 1.0 + 2**-7)


def test_an_ema_far_below_the_spacing_tracks_the_float32_ema():
    """decay 0.999 towards 1 from 0: each step moves the EMA by about 1e-3 * (1 - ema), below bf16's
    spacing near 1 (2**-8..2**-7) for most of the run. Round to nearest stalls; the stochastic
    one follows the float32 EMA (its mean over 20k elements within 1e-3)."""
    n, steps = 20_000, 3000
    target = torch.ones(n)
    stochastic = torch.zeros(n, dtype=torch.bfloat16)
    nearest = torch.zeros(n, dtype=torch.bfloat16)
    exact = torch.zeros(n)
    for step in range(steps):
        average_stochastic_([stochastic], [target], 1e-3, counter(step), 7)
        average_([nearest], [target.bfloat16()], 1e-3)
        average_([exact], [target], 1e-3)
    assert abs(stochastic.float().mean().item() - exact[0].item()) < 1e-3
    assert exact[0].item() - nearest[0].item() > 0.5  # round to nearest stalled far below


def test_skip_writes_nothing():
    a = torch.randn(100).bfloat16()
    before = a.clone()
    average_stochastic_([a], [torch.randn(100)], 0.5, counter(0), 0, skip=torch.tensor(True))
    assert torch.equal(a, before)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ([torch.zeros(3).bfloat16()], [torch.zeros(3, dtype=torch.float64)], counter(0)),
         "a float16/bfloat16 average takes a float16, bfloat16 or float32 current"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], counter(0)),
         "float32/float64 one its own dtype"),
        (lambda: ([torch.zeros(3).bfloat16()], [torch.zeros(3)], torch.tensor(0)), None),
        (lambda: ([torch.zeros(3).bfloat16()], [torch.zeros(3)], torch.tensor([0])),
         "counter must be a 0-dim int64 tensor"),
        (lambda: ([torch.zeros(3).bfloat16()], [torch.zeros(3)], torch.tensor(0, dtype=torch.int32)),
         "counter must be a 0-dim int64 tensor"),
        (lambda: ([torch.zeros(3).bfloat16()], [torch.zeros(4)], counter(0)), "shape mismatch"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(make, match):
    averaged, current, count = make()
    before = [a.clone() for a in averaged]
    if match is None:
        average_stochastic_(averaged, current, 0.5, count, 0)  # torch.tensor(0) is int64: fine
        return
    with pytest.raises(RuntimeError, match=match):
        average_stochastic_(averaged, current, 0.5, count, 0)
    for a, b in zip(averaged, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [1.5, True, 2**64, "1"])
def test_seed_must_be_a_64_bit_integer(seed):
    with pytest.raises(TypeError, match="seed must be a 64-bit integer"):
        average_stochastic_([torch.zeros(2).bfloat16()], [torch.zeros(2)], 0.5, counter(0), seed)


def test_in_place_rules():
    leaf = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        torch.ops.swa_fast.average_stochastic_([leaf], [torch.zeros(3)], torch.tensor(0.5), counter(0), 0, None)
    a = torch.zeros(3, dtype=torch.bfloat16)
    version = a._version
    average_stochastic_([a], [torch.ones(3)], 0.5, counter(0), 0)
    assert a._version > version


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    def sample():
        return ([torch.randn(33, device=device).bfloat16(), torch.randn(5, device=device).half(),
                 torch.randn(7, device=device), torch.zeros(2, dtype=torch.long, device=device)],
                [torch.randn(33, device=device), torch.randn(5, device=device).half(),
                 torch.randn(7, device=device).bfloat16(), torch.tensor([1, 2], device=device)])

    for skip in (None, torch.tensor(False, device=device)):
        averaged, current = sample()
        torch.library.opcheck(torch.ops.swa_fast.average_stochastic_.default,
                              (averaged, current, torch.tensor(0.25, device=device), counter(4, device), 3, skip))
