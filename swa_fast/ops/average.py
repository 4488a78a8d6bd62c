"""The averaging ops: fake kernels and Python wrappers of ``average_``, ``multi_average_``,
``average_moments_``, ``swag_moments_``, ``average_stochastic_`` and ``nonfinite_flag``.

Their schemas and checks are ``csrc/average_args.{h,cpp}``; their kernels
``csrc/cpu/average_cpu.cpp`` and ``csrc/cuda/average_cuda.cu``. The fake
kernels run the same C++ checks on metadata (``_C.validate_average_args``,
``_C.validate_multi_average_args``, ``_C.validate_swag_args``, ``_C.validate_stochastic_args``), so
``torch.compile`` reports bad arguments while tracing as eager mode would.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from swa_fast.ops import _C


@torch.library.register_fake("swa_fast::average_")
def _average_fake(averaged, current, weight, skip=None) -> None:
    _C.validate_average_args("swa_fast.average_", averaged, [], False, current, weight, skip)


@torch.library.register_fake("swa_fast::multi_average_")
def _multi_average_fake(averaged, current, weights, skip=None) -> None:
    _C.validate_multi_average_args("swa_fast.multi_average_", averaged, current, weights, skip)


@torch.library.register_fake("swa_fast::average_moments_")
def _average_moments_fake(mean, sq_mean, current, weight, skip=None) -> None:
    _C.validate_average_args("swa_fast.average_moments_", mean, sq_mean, True, current, weight, skip)


@torch.library.register_fake("swa_fast::swag_moments_")
def _swag_moments_fake(mean, variance, deviation, current, weight, skip=None) -> None:
    _C.validate_swag_args("swa_fast.swag_moments_", mean, variance, deviation, current, weight, skip)


@torch.library.register_fake("swa_fast::average_stochastic_")
def _average_stochastic_fake(averaged, current, weight, counter, seed, skip=None) -> None:
    _C.validate_stochastic_args("swa_fast.average_stochastic_", averaged, current, weight, counter, skip)


@torch.library.register_fake("swa_fast::nonfinite_flag")
def _nonfinite_flag_fake(tensors):
    _C.check_nonfinite_args(tensors)
    return tensors[0].new_empty((), dtype=torch.bool)


Weight = Union[float, Tensor]


def dtypes_and_devices(tensors: Sequence[Tensor]) -> bytes:
    """The dtype and device of every tensor, in order, as bytes: equal exactly when no tensor's
    dtype or device changed (one C++ call, cheaper than reading both attributes in Python)."""
    return _C.dtypes_and_devices(tensors)


def is_fusable_pair(averaged: Tensor, current: Tensor) -> bool:
    """Whether the fused ops take this (averaged, current) pair as it is: the dtype pair
    (``csrc/average_args.cpp``, ``is_supported_dtype_pair``) and a dense averaged tensor.
    The rest (complex, float8, a current more precise than its average) go through torch."""
    return _C.is_fusable_pair(averaged, current)


def weight_tensor(weight: Weight, device: torch.device) -> Tensor:
    """The 0-dim weight tensor the ops take; checks a Python float's range.

    A float becomes a float64 tensor filled on ``device`` (a fill kernel, not a
    host-to-device copy, so no sync). A tensor is passed through unchanged.
    """
    if isinstance(weight, Tensor):
        return weight
    return torch.full((), _checked_weight(weight, "weight"), dtype=torch.float64, device=device)


def _checked_weight(weight: float, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):  # True would be weight 1, a copy
        raise TypeError(f"{name} must be a number in [0, 1] (or a tensor), got {type(weight).__name__} {weight!r}")
    value = float(weight)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {weight}")
    return value


def weights_tensor(weights: Union[Sequence[float], Tensor], device: torch.device) -> Tensor:
    """The 1-D weights tensor :func:`multi_average_` takes; checks Python floats' range.

    Floats become a float64 tensor filled on ``device`` one element at a time (fills,
    not a host-to-device copy, so no sync). A tensor is passed through unchanged.
    """
    if isinstance(weights, Tensor):
        return weights
    values = [_checked_weight(w, f"weights[{k}]") for k, w in enumerate(weights)]
    result = torch.empty(len(values), dtype=torch.float64, device=device)
    for k, value in enumerate(values):
        result[k].fill_(value)
    return result


def _device_of(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if len(tensors) else torch.device("cpu")


def average_(
    averaged: Sequence[Tensor],
    current: Sequence[Tensor],
    weight: Weight,
    *,
    skip: Optional[Tensor] = None,
) -> None:
    """In place, for every i: ``averaged[i] = torch.lerp(averaged[i], current[i], weight)``.

    One fused pass over the whole list (CPU: threads over chunks of all
    tensors; CUDA: multi-tensor-apply launches of up to 320 chunks of 64k
    elements and 53 to 117 tensors each with the default 4 KB kernel arguments,
    one group of launches per dtype pair; see swa_fast.ops.launch_plan).

    Args:
        averaged: the running averages, updated in place. fp32/fp64/fp16/bf16;
            integer and bool tensors are copied from ``current``.
        current: the new values, same shapes; the averaged dtype or a
            lower-precision floating dtype (e.g. a bf16 model into fp32 averages).
        weight: in [0, 1]; a float, or a 0-dim float32/float64 tensor on the
            averaged device (the value is then read on the device: no sync).
            SWA uses 1/(n+1), EMA 1-decay; 1 is an exact copy.
        skip: optional 0-dim bool tensor on the device; when true nothing is
            written (see :func:`nonfinite_flag`).
    """
    with torch.no_grad():
        torch.ops.swa_fast.average_(list(averaged), list(current), weight_tensor(weight, _device_of(averaged)), skip)


def multi_average_(
    averaged: Sequence[Sequence[Tensor]],
    current: Sequence[Tensor],
    weights: Union[Sequence[float], Tensor],
    *,
    skip: Optional[Tensor] = None,
) -> None:
    """K running averages of the same tensors from one read of them: in place, for every
    k and i, ``averaged[k][i] = torch.lerp(averaged[k][i], current[i], weights[k])``.

    Average k gets exactly what :func:`average_` ``(averaged[k], current, weights[k])``
    gives, bit for bit, but ``current`` is read once for all K (CPU: each block of it
    converted once; CUDA: each element loaded once for up to 8 averages, a further pass
    per 8 more), e.g. SWA and EMA of one model, or EMAs at several decays.

    Args:
        averaged: K lists of N tensors, list k the averages of weight k; every average
            of ``current[i]`` matches ``averaged[0][i]`` in shape, strides, dtype and
            device. Dtypes as in :func:`average_` (integer and bool tensors are copied
            into every list).
        current: the N new values.
        weights: K weights in [0, 1]: Python floats, or a 1-D float32/float64 tensor on
            the averaged device (then read on the device: no sync). 1 is an exact copy.
        skip: optional 0-dim bool tensor on the device; when true nothing is written.
    """
    lists = [list(a) for a in averaged]
    current = list(current)
    for k, averages in enumerate(lists):
        if len(averages) != len(current):
            raise ValueError(
                f"swa_fast.multi_average_: averaged[{k}] has {len(averages)} tensors but current has {len(current)}"
            )
    count = weights.numel() if isinstance(weights, Tensor) else len(weights)
    if count != len(lists):
        raise ValueError(
            f"swa_fast.multi_average_: {len(lists)} lists of averages but {count} weights; pass one weight per list"
        )
    device = _device_of(lists[0]) if lists else torch.device("cpu")
    flat = [t for averages in lists for t in averages]
    with torch.no_grad():
        torch.ops.swa_fast.multi_average_(flat, current, weights_tensor(weights, device), skip)


def average_moments_(
    mean: Sequence[Tensor],
    sq_mean: Sequence[Tensor],
    current: Sequence[Tensor],
    weight: Weight,
    *,
    skip: Optional[Tensor] = None,
) -> None:
    """SWAG's first and second moments in one pass: ``mean[i] = lerp(mean[i], x, w)``,
    ``sq_mean[i] = lerp(sq_mean[i], x * x, w)`` with ``x = current[i]``.

    ``sq_mean[i]`` must match ``mean[i]`` in shape, strides and dtype; other
    arguments as in :func:`average_`.
    """
    with torch.no_grad():
        torch.ops.swa_fast.average_moments_(
            list(mean), list(sq_mean), list(current), weight_tensor(weight, _device_of(mean)), skip
        )


def swag_moments_(
    mean: Sequence[Tensor],
    variance: Sequence[Tensor],
    deviation: Optional[Sequence[Tensor]],
    current: Sequence[Tensor],
    weight: Weight,
    skip: Optional[Tensor] = None,
) -> None:
    """One SWAG collection (Maddox et al. 2019) in one pass, with a centred variance: in place,
    for every element of every i, with ``x = current[i]``, ``m = mean[i]``, ``v = variance[i]``
    and ``w = weight``::

        d             = x - m
        mean[i]      <- lerp(m, x, w)                 bitwise what average_(mean, current, w) gives
        variance[i]  <- (1 - w) * (v + (w * d) * d)   the last two terms one fused multiply-add
        deviation[i] <- x - mean_new

    computed in float32 (float64 for float64 averages), each result rounded once to the
    averages' dtype. With ``w = 1/(n+1)`` (``n`` collections so far; the first weight is 1)
    the variance is exactly the population variance of the collected values, updated by
    Welford's recurrence ``var_{n+1} = (1 - w)(var_n + w d^2)``; for any ``w`` in [0, 1] it
    is the exponentially weighted variance (West 1979). Unlike ``E[x^2] - E[x]^2``
    (:func:`average_moments_`), it keeps its digits when the spread is tiny next to the mean.
    With ``w = 1`` the mean is an exact copy of ``current`` and, for finite values, the
    variance and the deviation are 0.

    Args:
        mean: the running means (fp32/fp64/fp16/bf16), updated in place.
        variance: one tensor per mean tensor, matching it in shape, strides, dtype and device.
        deviation: ``x - mean_new`` is written here: one tensor per mean tensor, matching it in
            shape, strides, dtype and device (e.g. the columns of a ring buffer of SWAG's
            low-rank deviations, non-overlapping views of one storage), or an empty list
            (or None) to write no deviation (diagonal SWAG).
        current: the new values; the averages' dtype or a lower-precision floating dtype.
        weight: in [0, 1]; a float, or a 0-dim float32/float64 tensor on the averages' device
            (then read on the device: no sync). SWAG uses ``1/(n+1)``.
        skip: optional 0-dim bool tensor on the device; when true nothing is written.

    No written tensor may share memory with another tensor of the call.
    """
    deviation = [] if deviation is None else list(deviation)
    with torch.no_grad():
        torch.ops.swa_fast.swag_moments_(
            list(mean), list(variance), deviation, list(current), weight_tensor(weight, _device_of(mean)), skip
        )


def is_stochastic_pair(averaged: Tensor, current: Tensor) -> bool:
    """Whether :func:`average_stochastic_` takes this (averaged, current) pair as it is: a
    float16/bfloat16 average of a float16, bfloat16 or float32 tensor, float32/float64 averages
    as for :func:`average_` (``csrc/average_args.cpp``, ``is_stochastic_dtype_pair``), and a
    dense averaged tensor."""
    return _C.is_stochastic_pair(averaged, current)


SEED_RANGE = (-(2**63), 2**63 - 1)


def average_stochastic_(
    averaged: Sequence[Tensor],
    current: Sequence[Tensor],
    weight: Weight,
    counter: Tensor,
    seed: int,
    *,
    skip: Optional[Tensor] = None,
) -> None:
    """:func:`average_` with stochastic rounding of float16/bfloat16 averages (unbiased).

    Each value is computed exactly as :func:`average_` computes it, in float32, and then
    rounded to the average's 16-bit dtype stochastically: up with probability
    ``(r - lo) / (hi - lo)`` (``lo``, ``hi`` the neighbours of the float32 result ``r``),
    else down, so the stored average equals ``r`` in expectation, exactly. An EMA whose
    per-step change ``(1 - decay) * (x - avg)`` is far below bf16's spacing then still moves
    (round-to-nearest would drop every such step), at half the memory of a float32 EMA.
    float32/float64 averages are updated exactly as :func:`average_` updates them.

    The random bits are a pure function of ``(seed, counter, tensor, element)``
    (Philox4x32-10): reproducible, the same on the CPU and on CUDA and for any thread count,
    and a resumed run draws what the uninterrupted one would have. ``tensor`` is the pair's
    position among the pairs of its (averaged dtype, current dtype) in the call.

    Args:
        averaged: the running averages, updated in place (fp16/bf16 rounded stochastically;
            fp32/fp64 as :func:`average_`; integer/bool copied).
        current: the new values, same shapes. A fp16/bf16 average takes fp16, bf16 or fp32
            values (e.g. a float32 model into a bf16 EMA); fp32/fp64 averages as for
            :func:`average_`.
        weight: in [0, 1]; a float, or a 0-dim float32/float64 tensor on the averaged device.
        counter: 0-dim int64 tensor on the averaged device, read there (no sync): which update
            this is; pass a new value each update (e.g. the number of updates so far).
        seed: the stream's seed, any 64-bit integer.
        skip: optional 0-dim bool tensor on the device; when true nothing is written.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not \
            SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
        raise TypeError(f"seed must be a 64-bit integer, got {type(seed).__name__} {seed!r}")
    with torch.no_grad():
        torch.ops.swa_fast.average_stochastic_(
            list(averaged), list(current), weight_tensor(weight, _device_of(averaged)), counter, int(seed), skip
        )


def nonfinite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: True if any value is NaN or Inf.

    Computed on the device without a sync; pass it as ``skip=`` to
    :func:`average_` to drop an update that would poison the average.
    """
    if len(tensors) == 0:
        raise ValueError("nonfinite_flag needs at least one tensor (the flag is created on their device)")
    return torch.ops.swa_fast.nonfinite_flag(list(tensors))
