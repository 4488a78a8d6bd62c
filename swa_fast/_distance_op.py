"""The distance op: its fake kernel and the low-level wrapper.

``torch.ops.swa_fast.distance(a, b=None) -> (per_tensor, total)`` is defined in
``csrc/distance_args.cpp``; its kernels are ``csrc/cpu/distance_cpu.cpp`` and
``csrc/cuda/distance_cuda.cu``. Importing this module registers the fake
kernel, which runs the same C++ checks as the real kernels
(``_C.validate_distance_args``), so ``torch.compile`` reports bad arguments
while tracing as eager mode would.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from swa_fast._ops import _C

_RESULT_DTYPES = {"Float": torch.float32, "Double": torch.float64}


@torch.library.register_fake("swa_fast::distance")
def _distance_fake(a, b=None):
    dtype = _RESULT_DTYPES[_C.validate_distance_args(a, b)]
    return a[0].new_empty((len(a),), dtype=dtype), a[0].new_empty((), dtype=dtype)


class Distances(NamedTuple):
    """The two results of the distance op; unpacks as ``per_tensor, total``."""

    per_tensor: Tensor
    """1-D, one L2 norm per tensor of the list."""
    total: Tensor
    """0-dim, the L2 norm of the whole list (as if every tensor were flattened into one)."""


def distance_norms(a: Sequence[Tensor], b: Optional[Sequence[Tensor]] = None) -> Distances:
    """Per-tensor and total L2 norms of ``a[i] - b[i]`` (of ``a[i]`` when ``b`` is None), in one pass.

    The fused op behind :func:`swa_fast.distance.weight_distance`. Accumulated
    in float32, or float64 when any input tensor is float64; both results
    have that dtype and live on ``a[0]``'s device. The reduction order is
    fixed, so the same inputs give the same bits on every call (on CPU,
    whatever the thread count). Nothing is read back to the host: on a GPU the
    call returns at once and the results are ready when the stream reaches
    them.

    Args:
        a: floating tensors (fp16, bf16, fp32, fp64), all on one device, not empty.
        b: optional, the same length and shapes as ``a``; each ``b[i]`` may have
            another floating dtype than ``a[i]`` (a bf16 model against an fp32
            snapshot). Any memory layouts (views are read through a copy).

    Returns:
        ``Distances(per_tensor, total)``: a 1-D tensor of ``len(a)`` norms and a
        0-dim tensor. Empty tensors in the list have norm 0.

    Raises:
        ValueError: an empty ``a`` (there is no device to create the results on).
        RuntimeError: a length or shape mismatch (naming the index), tensors
            on several devices, or a non-floating tensor.
    """
    if len(a) == 0:
        raise ValueError("distance_norms needs at least one tensor in a (the results are created on its device)")
    with torch.no_grad():
        per_tensor, total = torch.ops.swa_fast.distance(list(a), None if b is None else list(b))
    return Distances(per_tensor, total)
