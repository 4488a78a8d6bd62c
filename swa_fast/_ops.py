"""Loads ``swa_fast._C``, registers fake kernels, and wraps ``torch.ops.swa_fast``.

Importing this module is what makes ``torch.ops.swa_fast.*`` exist. It fails
with an ImportError that says how to build when the extension is missing, was
built for another torch, or was built from other sources than this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from swa_fast._source_hash import source_hash

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_BUILD_HELP = (
    "Build it from the swa_fast source checkout, after installing torch "
    f"(e.g. `pip install torch==2.13.0`):\n    {BUILD_COMMAND}\n"
    "(--no-build-isolation makes the build use the torch you have instead of downloading another)."
)


def _host_supports_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust the build
        return True
    return " avx2" in flags and " fma" in flags


def _load_extension():
    try:
        from swa_fast import _C
    except ImportError as error:
        raise ImportError(
            f"swa_fast's compiled extension swa_fast._C could not be loaded ({error}).\n{_BUILD_HELP}"
        ) from error
    info = _C.build_info()
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"swa_fast._C was built for torch {info['torch_version']} but torch {torch.__version__} is "
            f"installed; rebuild it.\n{_BUILD_HELP}"
        )
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir() and os.environ.get("SWA_FAST_SKIP_SOURCE_CHECK") != "1":
        current = source_hash(csrc, with_cuda=info["cuda"])
        if current != info["source_hash"]:
            raise ImportError(
                f"swa_fast._C is stale: it was built from sources {info['source_hash']} but {csrc} is now "
                f"{current}.\n{_BUILD_HELP}\n(Set SWA_FAST_SKIP_SOURCE_CHECK=1 to load the stale build anyway.)"
            )
    if info["cpu_capability"] == "avx2" and not _host_supports_avx2():
        raise ImportError(
            "swa_fast._C was compiled for AVX2+FMA, which this CPU lacks. Rebuild with "
            f"SWA_FAST_CPU_CAPABILITY=default {BUILD_COMMAND}"
        )
    return _C


_C = _load_extension()
BUILD_INFO: dict = dict(_C.build_info())


# The fake kernels run the real kernels' metadata checks, so torch.compile
# reports bad arguments while tracing, as eager mode would.
@torch.library.register_fake("swa_fast::average_")
def _average_fake(averaged, current, weight, skip=None) -> None:
    _C.validate_average_args("swa_fast.average_", averaged, [], False, current, weight, skip)


@torch.library.register_fake("swa_fast::average_moments_")
def _average_moments_fake(mean, sq_mean, current, weight, skip=None) -> None:
    _C.validate_average_args("swa_fast.average_moments_", mean, sq_mean, True, current, weight, skip)


@torch.library.register_fake("swa_fast::nonfinite_flag")
def _nonfinite_flag_fake(tensors):
    _C.check_nonfinite_args(tensors)
    return tensors[0].new_empty((), dtype=torch.bool)


Weight = Union[float, Tensor]


def weight_tensor(weight: Weight, device: torch.device) -> Tensor:
    """The 0-dim weight tensor the ops take; checks a Python float's range.

    A float becomes a float64 tensor filled on ``device`` (a fill kernel, not a
    host-to-device copy, so no sync). A tensor is passed through unchanged.
    """
    if isinstance(weight, Tensor):
        return weight
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    return torch.full((), float(weight), dtype=torch.float64, device=device)


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
    tensors; CUDA: a multi-tensor-apply launch per ~64 tensors).

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


def nonfinite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: True if any value is NaN or Inf.

    Computed on the device without a sync; pass it as ``skip=`` to
    :func:`average_` to drop an update that would poison the average.
    """
    if len(tensors) == 0:
        raise ValueError("nonfinite_flag needs at least one tensor (the flag is created on their device)")
    return torch.ops.swa_fast.nonfinite_flag(list(tensors))
