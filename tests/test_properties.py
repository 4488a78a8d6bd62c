"""Property-based bad-input suite: every public op and module, on random input.

For random shapes, dtypes, strides, storage offsets, aliasing and values
(hypothesis), each call must either give the correct result (against a float64
or pure-torch reference) or raise a clear error (a RuntimeError, ValueError or
TypeError that names the op, never an internal assert) having modified
nothing. The examples are derandomized: CI runs the same cases every time.
``CASES`` below is how many each test draws (the averaging ops' test, which
draws three ops, and the numeric-arguments test, which draws over every entry
point, twice as many). Beside the ops: every numeric argument of the public API
(negative, zero, fractional, huge, non-finite, bool) and named weights in any
order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import swa_utils as torch_swa

import swa_fast
from swa_fast import checkpoint_average, regime, swa_utils
from swa_fast.distance import WeightDistanceTracker, distance_norms, fit_log, weight_distance
from swa_fast.nn.functional import ghost_batch_norm

from reference import ghost_chunk_loop

CASES = 150
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHERS = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6, torch.float64: 1e-12}
CLEAR_ERRORS = (RuntimeError, ValueError, TypeError)


# ---------------------------------------------------------------------------
# Random tensors: a values pool, then views of it with any layout and offset
# ---------------------------------------------------------------------------


@dataclass
class Spec:
    shape: tuple
    dtype: torch.dtype
    layout: str  # contiguous, transposed, strided, offset, expanded
    seed: int


def spec_strategy(dtypes=None, max_dim: int = 3, max_size: int = 5):
    return st.builds(
        Spec,
        shape=st.lists(st.integers(0, max_size), min_size=0, max_size=max_dim).map(tuple),
        dtype=st.sampled_from(dtypes or FLOATS + OTHERS),
        layout=st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "offset", "expanded"]),
        seed=st.integers(0, 2**16),
    )


def values(shape, dtype, seed, special: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    if special and x.numel():
        flat = x.view(-1)
        flat[torch.randint(0, flat.numel(), (1,), generator=generator)] = float("nan")
    if dtype == torch.bool:
        return x > 0
    if not (dtype.is_floating_point or dtype.is_complex):
        return (x * 10).round().clamp(0, 100).to(dtype)
    return x.to(dtype)


def build(spec: Spec, special: bool = False) -> torch.Tensor:
    """A tensor of spec.shape whose memory layout is spec.layout (expanded: overlapping)."""
    shape = spec.shape
    if spec.layout == "transposed" and len(shape) >= 2:
        return values(shape[::-1], spec.dtype, spec.seed, special).transpose(0, -1) if len(shape) == 2 else \
            values((shape[1], shape[0], *shape[2:]), spec.dtype, spec.seed, special).transpose(0, 1)
    if spec.layout == "strided" and len(shape) >= 1:
        base = values((*shape[:-1], 2 * shape[-1]), spec.dtype, spec.seed, special)
        return base[..., ::2]
    if spec.layout == "offset":
        flat = values((1 + int(torch.tensor(shape).prod()) if shape else 2,), spec.dtype, spec.seed, special)
        return flat[1:].view(shape) if shape else flat[1:].view(())
    if spec.layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
        return values((1, *shape[1:]), spec.dtype, spec.seed, special).expand(shape)
    return values(shape, spec.dtype, spec.seed, special)


def snapshot(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def unchanged(before: List[torch.Tensor], after: List[torch.Tensor]) -> bool:
    """Bitwise equal (NaNs included): through the raw bytes."""
    for b, a in zip(before, after):
        if b.shape != a.shape or b.dtype != a.dtype or not torch.equal(raw_bytes(b), raw_bytes(a)):
            return False
    return True


def assert_clear_error(error: Exception, op: str) -> None:
    message = str(error)
    assert isinstance(error, CLEAR_ERRORS), f"{type(error).__name__}: {message}"
    assert "INTERNAL ASSERT" not in message, message
    assert op in message or "Expected more than 1 value per channel" in message, message


# ---------------------------------------------------------------------------
# average_ / average_moments_ / multi_average_ / nonfinite_flag
# ---------------------------------------------------------------------------


def lerp_reference(avg: torch.Tensor, cur: torch.Tensor, weight: float) -> torch.Tensor:
    if not avg.is_floating_point():
        return cur.to(avg.dtype)
    if weight == 1.0:
        return cur.to(avg.dtype)
    a, c = avg.double(), cur.double()
    return (a + weight * (c - a)).to(avg.dtype)


def assert_lerped(got: torch.Tensor, want: torch.Tensor) -> None:
    if not got.is_floating_point():
        assert torch.equal(got, want)
        return
    tol = TOLERANCE[got.dtype] * 4
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True)


pairs = st.lists(st.tuples(spec_strategy(), st.sampled_from(FLOATS + OTHERS)), min_size=0, max_size=4)


WEIGHTS = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, float("nan")]), st.floats(-1, 2))


@settings(SETTINGS, max_examples=2 * CASES)  # three ops: average_, average_moments_, multi_average_
@given(
    pairs=pairs,
    weight=WEIGHTS,
    # multi_average_'s further weights in range (the first one, `weight`, may be out of it).
    more_weights=st.lists(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)), min_size=8, max_size=8),
    alias=st.sampled_from(["none", "same_twice", "current_is_averaged", "overlap", "mismatch"]),
    special=st.booleans(),
    op=st.sampled_from(["average_", "average_moments_", "multi_average_"]),
    count=st.integers(1, 9),
)
def test_average_ops_are_right_or_refuse_cleanly(pairs, weight, more_weights, alias, special, op, count):
    moments, multi = op == "average_moments_", op == "multi_average_"
    count = count if multi else 1
    weights = [weight, *more_weights][:count]
    # multi_average_: `count` lists of averages like the first (the same specs, other values).
    lists = [[build(Spec(spec.shape, spec.dtype, spec.layout, spec.seed + 1000 * k)) for spec, _ in pairs]
             for k in range(count)]
    averaged = lists[0]
    # current: the averaged dtype or another one, same shape, any layout
    current = [build(Spec(spec.shape, cur_dtype, spec.layout, spec.seed + 1), special) for spec, cur_dtype in pairs]
    if averaged and alias == "same_twice":
        if count > 1:
            lists[-1][0] = averaged[0]  # one tensor in two lists of averages
        else:
            averaged.append(averaged[0])
            current.append(current[0])
    elif averaged and alias == "current_is_averaged":
        current[0] = averaged[0]  # allowed by average_ (torch's lerp_(a, a, w)), refused by the others
    elif averaged and alias == "overlap" and averaged[0].numel() > 1:
        base = averaged[0].reshape(-1) if averaged[0].is_contiguous() else averaged[0]
        if base.dim() == 1:
            averaged[0], current[0] = base[1:], base[:-1]
    elif averaged and alias == "mismatch" and count > 1:
        lists[-1][0] = build(Spec((*pairs[0][0].shape, 2), pairs[0][0].dtype, "contiguous", 5))
    sq_mean = [a.detach().clone() if a.is_floating_point() else a for a in averaged] if moments else []
    written = [t for ts in lists for t in ts] + sq_mean
    before_lists, before_cur, before_sq = [snapshot(ts) for ts in lists], snapshot(current), snapshot(sq_mean)
    try:
        if moments:
            swa_fast.average_moments_(averaged, sq_mean, current, weight)
        elif multi:
            swa_fast.multi_average_(lists, current, weights)
        else:
            swa_fast.average_(averaged, current, weight)
    except CLEAR_ERRORS as error:
        event("refused")
        if isinstance(error, ValueError) and re.search(r"weights?(\[\d+\])? must be in \[0, 1\]", str(error)):
            assert not all(0 <= w <= 1 for w in weights)  # the Python wrapper's check
        else:
            assert_clear_error(error, f"swa_fast.{op}")
        assert all(unchanged(b, ts) for b, ts in zip(before_lists, lists))
        assert unchanged(before_cur, current) and unchanged(before_sq, sq_mean)
        return
    event(f"computed ({op})")
    assert all(0 <= w <= 1 for w in weights)
    written_ids = {id(t) for t in written}
    for k, (averages, befores) in enumerate(zip(lists, before_lists)):
        for i, (avg, cur) in enumerate(zip(averages, current)):
            assert_lerped(avg, lerp_reference(befores[i], before_cur[i], weights[k]))
            if id(cur) not in written_ids:
                assert unchanged([before_cur[i]], [cur])
    for i, sq in enumerate(sq_mean):
        x = before_cur[i].double()
        assert_lerped(sq, lerp_reference(before_sq[i], x * x, weight))


@SETTINGS
@given(specs=st.lists(spec_strategy(), min_size=0, max_size=4), special=st.booleans())
def test_nonfinite_flag_is_right_or_refuses_cleanly(specs, special):
    tensors = [build(spec, special) for spec in specs]
    before = snapshot(tensors)
    try:
        flag = swa_fast.nonfinite_flag(tensors)
    except (ValueError, RuntimeError) as error:
        event("refused")
        assert not tensors or "nonfinite_flag" in str(error)
        assert unchanged(before, tensors)
        return
    event("computed")
    want = any(
        (not torch.isfinite(t.float() if t.dtype == torch.float8_e4m3fn else t).all())
        for t in before if t.is_floating_point() or t.is_complex()
    )
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) == want
    assert unchanged(before, tensors)


# ---------------------------------------------------------------------------
# distance
# ---------------------------------------------------------------------------


@SETTINGS
@given(
    a_specs=st.lists(spec_strategy(FLOATS + [torch.int64, torch.complex64]), min_size=0, max_size=4),
    b_dtypes=st.lists(st.sampled_from(FLOATS + [torch.int64]), min_size=4, max_size=4),
    with_b=st.booleans(),
    mismatch=st.booleans(),
)
def test_distance_is_right_or_refuses_cleanly(a_specs, b_dtypes, with_b, mismatch):
    a = [build(spec) for spec in a_specs]
    b = None
    if with_b:
        b = [build(Spec(spec.shape, dtype, spec.layout, spec.seed + 7)) for spec, dtype in zip(a_specs, b_dtypes)]
        if mismatch and b:
            b[0] = build(Spec((*a_specs[0].shape, 2), b_dtypes[0], "contiguous", 3))
    before_a, before_b = snapshot(a), snapshot(b or [])
    try:
        per_tensor, total = distance_norms(a, b)
    except CLEAR_ERRORS as error:
        event("refused")
        assert not a or "swa_fast.distance" in str(error) or "at least one tensor" in str(error), str(error)
        assert unchanged(before_a, a) and unchanged(before_b, b or [])
        return
    event("computed")
    acc = torch.float64 if any(t.dtype == torch.float64 for t in a + (b or [])) else torch.float32
    assert per_tensor.dtype == total.dtype == acc
    diffs = [x.double() - (0 if b is None else y.double()) for x, y in zip(before_a, before_b or before_a)]
    want = torch.stack([d.norm() for d in diffs]) if diffs else torch.zeros(0, dtype=torch.float64)
    tol = 1e-5 if acc == torch.float32 else 1e-12
    torch.testing.assert_close(per_tensor.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(total.double(), want.norm(), rtol=tol, atol=tol)
    assert unchanged(before_a, a) and unchanged(before_b, b or [])


# ---------------------------------------------------------------------------
# ghost batch norm: the functional form and its running-statistics update
# ---------------------------------------------------------------------------


@SETTINGS
@given(
    batch=st.integers(0, 7),
    channels=st.integers(1, 3),
    spatial=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    dtype=st.sampled_from(FLOATS),
    ghost=st.integers(0, 5),
    channels_last=st.booleans(),
    affine=st.booleans(),
    running=st.sampled_from(["none", "train", "eval"]),
    momentum=st.sampled_from([None, 0.1, 1.5]),
    eps=st.sampled_from([1e-5, 1e-3, 0.0]),
    stats_mode=st.sampled_from(["per_ghost", "averaged"]),
    seed=st.integers(0, 2**16),
)
def test_ghost_batch_norm_is_right_or_refuses_cleanly(
    batch, channels, spatial, dtype, ghost, channels_last, affine, running, momentum, eps, stats_mode, seed
):
    shape = (batch, channels, *spatial)
    x = values(shape, dtype, seed)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (values((channels,), param_dtype, seed + 1).abs() + 0.5) if affine else None
    bias = values((channels,), param_dtype, seed + 2) if affine else None
    stats = [values((channels,), param_dtype, seed + 3), values((channels,), param_dtype, seed + 4).abs() + 0.5]
    tracked = torch.tensor(2)
    running_mean, running_var = (stats if running != "none" else (None, None))
    training = running != "eval"
    before = snapshot([x] + stats + [tracked])
    try:
        out = ghost_batch_norm(x, ghost, running_mean, running_var, weight, bias, training, momentum, eps,
                               tracked if running == "train" else None, stats_mode)
    except CLEAR_ERRORS as error:
        event("refused")
        assert_clear_error(error, "ghost")
        assert unchanged(before, [x] + stats + [tracked])
        return
    event("computed")
    # What succeeded must be the reference: F.batch_norm in eval, the chunk loop otherwise.
    assert ghost >= 1  # any momentum is valid, as for nn.BatchNorm
    x64 = before[0].double()
    w64 = None if weight is None else weight.double()
    b64 = None if bias is None else bias.double()
    if running == "eval":
        want = F.batch_norm(x64, before[1].double(), before[2].double(), w64, b64, False, 0.0, eps)
    else:
        assert eps > 0
        want = ghost_chunk_loop(x64, ghost, w64, b64, eps=eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    tol = max(TOLERANCE[dtype] * 8, 1e-9)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert unchanged(before[:1], [x])


# ---------------------------------------------------------------------------
# AveragedModel: parity with torch's over random parameter sets
# ---------------------------------------------------------------------------


class Params(nn.Module):
    def __init__(self, tensors: List[torch.Tensor], buffers: List[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=t.is_floating_point() or t.is_complex())
                                        for t in tensors])
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b)


@SETTINGS
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=4),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float64, torch.complex64]), min_size=4, max_size=4),
    buffer_dtypes=st.lists(st.sampled_from([torch.float32, torch.int64]), min_size=0, max_size=2),
    use_buffers=st.booleans(),
    ema=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_averaged_model_matches_torch(shapes, dtypes, buffer_dtypes, use_buffers, ema, seed):
    params = [values(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
    buffers = [values((3,), dtype, seed + 10 + i) for i, dtype in enumerate(buffer_dtypes)]
    model = Params(params, buffers)
    ours_kwargs = {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)} if ema else {}
    theirs_kwargs = {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.9)} if ema else {}
    ours = swa_utils.AveragedModel(model, use_buffers=use_buffers, **ours_kwargs)
    theirs = torch_swa.AveragedModel(model, use_buffers=use_buffers, **theirs_kwargs)
    for step in range(3):
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.copy_(values(t.shape, t.dtype, seed + 100 * step + t.numel()))
        try:
            theirs.update_parameters(model)
        except RuntimeError:
            event("torch refuses")
            return  # torch refuses (integer buffers averaged on some paths): nothing to compare with
        ours.update_parameters(model)
    event("compared with torch")
    mine, torchs = ours.state_dict(), theirs.state_dict()
    for key, value in torchs.items():
        if value.is_floating_point() or value.is_complex():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
        elif not use_buffers or key == "n_averaged":
            assert torch.equal(mine[key].cpu(), value.cpu()), key


# ---------------------------------------------------------------------------
# Numbers every public entry point takes: negative, zero, fractional, huge, non-finite, bool
# ---------------------------------------------------------------------------


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optimizer():
    return torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)


def _tracker_update(step):
    WeightDistanceTracker(nn.Linear(2, 2)).update(step)


def _load_count(value, shell: bool):
    model = nn.Linear(2, 2)
    if shell:
        averaged = swa_utils.AveragedModel(model)
        averaged.load_state_dict({**averaged.state_dict(), "n_averaged": value})
    else:
        average = swa_fast.WeightAverage(model)
        average.load_state_dict({**average.state_dict(), "n_averaged": value})


# (entry point called with the drawn value, the name its error must give, whether the value is valid)
NUMBER_ARGUMENTS = {
    "sqrt_lr_scaling lr": (lambda v: regime.sqrt_lr_scaling(v, 256, 128), "lr", lambda v: _real(v) and v > 0),
    "sqrt_lr_scaling batch_size": (lambda v: regime.sqrt_lr_scaling(0.1, v, 128), "batch_size",
                                   lambda v: _real(v) and v > 0),
    "adapt_regime epochs": (lambda v: regime.adapt_regime(v, [], 64, 32), "epochs", lambda v: _real(v) and v > 0),
    "adapt_regime milestone": (lambda v: regime.adapt_regime(10, [v], 64, 32), "milestone",
                               lambda v: _real(v) and 0 <= v <= 10),
    "adapt_regime dataset_size": (lambda v: regime.adapt_regime(10, [], 64, 32, dataset_size=v), "dataset_size",
                                  lambda v: _real(v) and v > 0),
    "swa_schedule_lr step": (lambda v: regime.swa_schedule_lr(v, 10, 0.1), "step", _real),
    "SWAScheduleLR total_steps": (lambda v: regime.SWAScheduleLR(_optimizer(), v), "total_steps",
                                  lambda v: _real(v) and v > 0),
    "SWAScheduleLR swa_lr": (lambda v: regime.SWAScheduleLR(_optimizer(), 10, swa_lr=v), "swa_lr",
                             lambda v: _real(v) and v >= 0),
    "LinearWarmup warmup_steps": (lambda v: regime.LinearWarmup(_optimizer(), v), "warmup_steps",
                                  lambda v: _real(v) and v >= 0),
    "LinearWarmup start_factor": (lambda v: regime.LinearWarmup(_optimizer(), 2, start_factor=v), "start_factor",
                                  lambda v: _real(v) and 0 <= v <= 1),
    "DistanceMilestoneLR gamma": (lambda v: regime.DistanceMilestoneLR(
        _optimizer(), WeightDistanceTracker(nn.Linear(2, 2)), [1.0], gamma=v), "gamma", lambda v: _real(v) and v > 0),
    "DistanceMilestoneLR milestone": (lambda v: regime.DistanceMilestoneLR(
        _optimizer(), WeightDistanceTracker(nn.Linear(2, 2)), [v]), "milestones", lambda v: _real(v) and v >= 0),
    "WeightDistanceTracker.update step": (_tracker_update, "step", lambda v: _integer(v) and v >= 0),
    "WeightDistanceTracker bucket_bytes": (lambda v: WeightDistanceTracker(nn.Linear(2, 2), bucket_bytes=v),
                                           "bucket_bytes", lambda v: _integer(v) and v > 0),
    "fit_log distance": (lambda v: fit_log([1, 2, 3], [1.0, v, 2.0]), "distance", _real),
    "get_ema_multi_avg_fn decay": (lambda v: swa_utils.get_ema_multi_avg_fn(v), "decay",
                                   lambda v: _real(v) and 0 <= v <= 1),
    "get_ema_multi_avg_fn warmup_gamma": (lambda v: swa_utils.get_ema_multi_avg_fn(0.9, warmup_gamma=v),
                                          "warmup_gamma", lambda v: _real(v) and v > 0),
    "get_ema_multi_avg_fn warmup_power": (lambda v: swa_utils.get_ema_multi_avg_fn(0.9, warmup_power=v),
                                          "warmup_power", lambda v: _real(v) and v > 0),
    "WeightAverage.update step": (lambda v: swa_fast.WeightAverage(nn.Linear(2, 2)).update(nn.Linear(2, 2), v),
                                  "step", lambda v: _integer(v) and v >= 0),
    "WeightAverage.load_state_dict n_averaged": (lambda v: _load_count(v, False), "n_averaged",
                                                 lambda v: _integer(v) and v >= 0),
    "AveragedModel.load_state_dict n_averaged": (lambda v: _load_count(v, True), "n_averaged",
                                                 lambda v: _integer(v) and v >= 0),
    "average_checkpoints weights": (lambda v: checkpoint_average._normalized_weights([v, 1.0], 2), "weights",
                                    lambda v: _real(v) and v >= 0),
    "average_ weight": (lambda v: swa_fast.average_([torch.zeros(3)], [torch.ones(3)], v), "weight",
                        lambda v: _real(v) and 0 <= v <= 1),
    "multi_average_ weights": (lambda v: swa_fast.multi_average_([[torch.zeros(3)]], [torch.ones(3)], [v]),
                               "weight", lambda v: _real(v) and 0 <= v <= 1),
}
NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -0.0, 0.5, 2.5, -2.5, 1e308, -1e-300, True, False, float("nan"), float("inf")]),
)


@settings(SETTINGS, max_examples=2 * CASES)
@given(entry=st.sampled_from(sorted(NUMBER_ARGUMENTS)), value=NUMBERS)
def test_every_numeric_argument_takes_its_range_or_names_itself(entry, value):
    """Negative, zero, fractional, huge and non-finite numbers (and bools) for every numeric argument
    of the public API: a value in range works; any other raises a clear error naming the argument."""
    call, name, valid = NUMBER_ARGUMENTS[entry]
    if valid(value):
        event("in range")
        try:
            call(value)
        except CLEAR_ERRORS as error:
            # In range by itself but refused in combination (e.g. weights summing to 0): still named.
            assert name in str(error) or "weights" in str(error), (entry, value, error)
            event("refused in combination")
        return
    event("out of range")
    try:
        call(value)
    except CLEAR_ERRORS as error:
        assert name in str(error), (entry, value, str(error))
    else:
        raise AssertionError(f"{entry} took {value!r}")


@SETTINGS
@given(names=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=6, unique=True), order=st.randoms(),
       moved=st.booleans())
def test_named_weights_pair_by_name_in_any_order(names, order, moved):
    """Reordered mappings (a state dict saved in another order) pair by name: the distance to a
    reordered copy of itself is 0 and to a moved copy is the same in any order; loading a reordered
    state dict into an average gives the same averages."""
    tensors = {n: torch.randn(i + 1, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    shuffled = list(names)
    order.shuffle(shuffled)
    other = {n: tensors[n] + (1.0 if moved else 0.0) for n in shuffled}
    expected = weight_distance(tensors, {n: other[n] for n in names}).item()
    assert weight_distance(tensors, other).item() == expected
    assert expected == 0.0 or moved
    model = nn.ParameterDict({n: nn.Parameter(t.clone()) for n, t in tensors.items()})
    average = swa_fast.WeightAverage(model)
    state = average.state_dict()
    reordered = {"averages": {k: state["averages"][k] + 1 for k in reversed(list(state["averages"]))},
                 "n_averaged": 3}
    fresh = swa_fast.WeightAverage(model)
    fresh.load_state_dict(reordered)
    for key, value in fresh.state_dict()["averages"].items():
        assert torch.equal(value, state["averages"][key] + 1), key


def test_the_suite_draws_many_cases():
    # Six property tests x CASES examples each, the averaging ops' and the numbers' twice.
    assert CASES * 9 >= 1350
