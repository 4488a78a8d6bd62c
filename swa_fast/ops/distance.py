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

from swa_fast.ops import _C
from swa_fast.averaging.sharding import ShardGroup, is_dtensor, layout_of, local_tensor, shard_groups, sum_over_shards

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

    DTensors (an FSDP2 model's parameters, sharded or replicated on any mesh)
    are measured whole: each rank runs the op on its local shards and the
    squared norms are summed over the shards with one all-reduce per sharding
    mesh dimension (no gather), so every rank must call it, and every rank
    gets the same results. ``b[i]`` must then be a DTensor with ``a[i]``'s
    mesh and placements (or plain where ``a[i]`` is plain).

    Returns:
        ``Distances(per_tensor, total)``: a 1-D tensor of ``len(a)`` norms and a
        0-dim tensor. Empty tensors in the list have norm 0.

    Raises:
        ValueError: an empty ``a`` (there is no device to create the results on);
            DTensors of ``a`` and ``b`` laid out differently, or a ``Partial`` one.
        RuntimeError: a length or shape mismatch (naming the index), tensors
            on several devices, or a non-floating tensor.
    """
    a, b = list(a), (None if b is None else list(b))
    if len(a) == 0:
        raise ValueError("distance_norms needs at least one tensor in a (the results are created on its device)")
    if any(is_dtensor(t) for t in a) or (b is not None and any(is_dtensor(t) for t in b)):
        return _sharded_distance_norms(a, b)
    with torch.no_grad():
        per_tensor, total = torch.ops.swa_fast.distance(a, b)
    return Distances(per_tensor, total)


def _sharded_distance_norms(a: Sequence[Tensor], b: Optional[Sequence[Tensor]]) -> Distances:
    """DTensors (FSDP2's parameters): the op on every rank's local shards, then the squared norms
    summed over the shards (:func:`combine_shard_norms`). ``b[i]`` must be laid out as ``a[i]``:
    the local shards are what is subtracted."""
    layouts = [layout_of(t) for t in a]
    if b is not None:
        if len(b) != len(a):
            raise ValueError(f"a has {len(a)} tensors but b has {len(b)}")
        for index, (tensor, layout) in enumerate(zip(b, layouts)):
            theirs = layout_of(tensor)
            if (layout is None) != (theirs is None) or (layout is not None and (
                    theirs.device_mesh != layout.device_mesh or theirs.placements != layout.placements)):
                raise ValueError(
                    f"b[{index}] is not sharded like a[{index}] ({_placement_text(theirs)} vs "
                    f"{_placement_text(layout)}): both must be DTensors on one mesh with the same placements, "
                    "or both plain tensors")
    groups = shard_groups(layouts, local_tensor(a[0]).device)
    local = distance_norms([local_tensor(t) for t in a], None if b is None else [local_tensor(t) for t in b])
    return combine_shard_norms(local.per_tensor, groups)


def combine_shard_norms(local_norms: Tensor, groups: Sequence[ShardGroup]) -> Distances:
    """Whole-tensor norms from the norms of every rank's local shards: the squared norm of a
    tensor is the sum of its shards' (a replicated tensor counts once). The total is the norm of
    the per-tensor norms, in the op's fixed order, so every rank gets the same bits."""
    with torch.no_grad():
        per_tensor = sum_over_shards(local_norms.square(), groups).sqrt()
        return Distances(per_tensor, distance_norms([per_tensor]).total)


def _placement_text(layout) -> str:
    return "a plain tensor" if layout is None else f"placements {tuple(layout.placements)}"
