"""``average_replicas_``: every rank's model replaced by the average of all ranks' models, in place.

The per-tensor way (``for p in model.parameters(): dist.all_reduce(p); p /= world``) pays one
collective's latency per tensor (a ResNet-50 has 161 parameters) and averages a bf16 model in
bf16. Here the tensors are packed into a few flat buckets per (device, accumulation dtype), one
``all_reduce`` per bucket, in fp32 or wider:

    pack    torch._foreach_copy_ of the tensors into views of a flat bucket (the dtype widened on copy)
    reduce  one all_reduce(SUM) per bucket, asynchronous, at most ``IN_FLIGHT`` buckets at a time
            (the next bucket is packed while the previous ones travel; memory: IN_FLIGHT buckets)
    unpack  divide by the world size (or, weighted, each rank scaled its bucket before the sum),
            torch._foreach_copy_ back into the tensors (rounded once to their dtype)

The all-reduce leaves the same bits on every rank, and the division and the copy back are the same
operations everywhere, so every rank ends with a bitwise identical model.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swa_fast.parallel.replica_checks import check_same_replicas, describe

IN_FLIGHT = 2  # buckets reduced at once: enough to overlap packing with communication, memory bounded
WHAT = "average_replicas_"


@dataclass
class Bucket:
    """Tensors averaged through one flat all-reduce: same device, same accumulation dtype."""

    device: torch.device
    dtype: torch.dtype
    tensors: List[Tensor] = field(default_factory=list)
    numel: int = 0


def accumulation_dtype(dtype: torch.dtype, wider: Optional[torch.dtype]) -> torch.dtype:
    """fp16/bf16 (and float8) sum in fp32; fp32/fp64 in their own dtype; ``wider`` widens further."""
    base = torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype
    return base if wider is None else torch.promote_types(base, wider)


Member = Tuple[str, str, Tensor]  # (name, "parameter" or "buffer", tensor)


def replica_members(model: nn.Module, buffers: bool) -> Tuple[List[Member], List[Member]]:
    """``(averaged, broadcast)``: ``(name, kind, tensor)`` of the floating/complex tensors to average
    and of the integer/bool ones to take from the group's first rank (``num_batches_tracked``).

    A DDP wrapper is looked through (its names lose the ``module.`` prefix, so a wrapped and an
    unwrapped replica compare equal). Tied parameters are averaged once.
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    named = [(name, "parameter", p) for name, p in module.named_parameters()]
    if buffers:
        named += [(name, "buffer", b) for name, b in module.named_buffers()]
    averaged, broadcast = [], []
    for name, kind, tensor in named:
        if type(tensor).__name__ == "DTensor" or hasattr(tensor, "_local_tensor"):
            raise ValueError(
                f"{WHAT}: {kind} {name!r} is a DTensor (a shard of a sharded model, FSDP2 or tensor parallel): "
                "average_replicas_ averages whole replicas, one per rank. Average the shards' replica group "
                "instead (pass group=) or gather the full model first."
            )
        if tensor.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{WHAT}: {kind} {name!r} is an inference tensor, which cannot be updated in place outside "
                "torch.inference_mode(); nothing was modified."
            )
        is_number = tensor.is_floating_point() or tensor.is_complex()
        (averaged if is_number else broadcast).append((name, kind, tensor))
    return averaged, broadcast


def normalized_weights(weights: Optional[Sequence[float]], world: int) -> Optional[List[float]]:
    """Each rank's share of the average (``None``: equal shares); checked on every rank alike."""
    if weights is None:
        return None
    values = [float(w) for w in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(values) != world:
        raise ValueError(f"{WHAT}: weights has {len(values)} entries for a group of {world} ranks (one per rank)")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"{WHAT}: weights must be finite and non-negative, got {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"{WHAT}: weights sum to 0; at least one rank must have a positive weight")
    return [w / total for w in values]


def make_buckets(tensors: Sequence[Tensor], bucket_bytes: int, wider: Optional[torch.dtype]) -> List[Bucket]:
    """Consecutive tensors of one (device, accumulation dtype) grouped into buckets of about
    ``bucket_bytes`` (a larger tensor gets a bucket of its own); the order is the tensors' order,
    the same on every rank."""
    open_buckets: Dict[Tuple[torch.device, torch.dtype], Bucket] = {}
    buckets: List[Bucket] = []
    for tensor in tensors:
        key = (tensor.device, accumulation_dtype(tensor.dtype, wider))
        bucket = open_buckets.get(key)
        size = tensor.numel() * key[1].itemsize
        if bucket is None or (bucket.numel and (bucket.numel * key[1].itemsize + size) > bucket_bytes):
            bucket = Bucket(*key)
            open_buckets[key] = bucket
            buckets.append(bucket)
        bucket.tensors.append(tensor)
        bucket.numel += tensor.numel()
    return buckets


def request_lines(averaged, broadcast, world: int, shares: Optional[List[float]], buffers: bool,
                  bucket_bytes: int, wider: Optional[torch.dtype]) -> List[str]:
    """What every rank must agree on: the tensors in order, then the request."""
    lines = [describe(name, kind, t) for name, kind, t in averaged]
    lines += [describe(name, kind, t) + " (taken from the first rank)" for name, kind, t in broadcast]
    lines.append(f"request: world {world}, weights {shares}, buffers {buffers}, bucket bytes {bucket_bytes}, "
                 f"accumulate_dtype {wider}")
    return lines


class _Reduction:
    """One bucket on its way: packed, all-reduce launched; :meth:`finish` writes the average back."""

    def __init__(self, bucket: Bucket, group, share: Optional[float], world: int):
        self.bucket = bucket
        self.world = world
        self.weighted = share is not None
        self.flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        self.views = []
        offset = 0
        for tensor in bucket.tensors:
            self.views.append(self.flat[offset:offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()
        torch._foreach_copy_(self.views, bucket.tensors)
        if self.weighted:
            self.flat.mul_(share)  # each rank scales its own replica; the sum is then the weighted mean
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def finish(self) -> None:
        self.work.wait()
        if not self.weighted:
            self.flat.div_(self.world)  # division, not a reciprocal product: the mean correctly rounded per sum
        torch._foreach_copy_(self.bucket.tensors, self.views)


@torch.no_grad()
def average_replicas_(
    model: nn.Module,
    group: Optional[dist.ProcessGroup] = None,
    *,
    weights: Optional[Sequence[float]] = None,
    buffers: bool = True,
    bucket_mb: float = 25.0,
    accumulate_dtype: Optional[torch.dtype] = None,
) -> None:
    """Replace every rank's parameters (and buffers) by their average over the process group, in place.

    A collective: every rank of ``group`` calls it with its own replica of one model. Afterwards
    every rank holds the same, bitwise identical model.

    Args:
        model: this rank's replica (a DDP wrapper is looked through). Not a sharded model: a
            DTensor parameter is refused.
        group: the process group to average over (default: the default group).
        weights: keyword-only; one non-negative weight per rank of ``group`` (by group rank), the same
            list on every rank; the average is ``sum_r w_r x_r / sum_r w_r``. Default: equal weights.
        buffers: keyword-only; also average the floating buffers (BN running statistics), and take
            the integer ones (``num_batches_tracked``) from the group's first rank. ``False`` leaves
            every buffer as it is on each rank.
        bucket_mb: keyword-only; the size of one flat all-reduce, in MiB of the accumulation dtype.
        accumulate_dtype: keyword-only; sum in at least this dtype (e.g. ``torch.float64`` for fp32
            models). Default: fp32 for fp16/bf16 tensors, their own dtype otherwise.

    Accuracy: the sum over ranks is accumulated in the accumulation dtype (fp32 for a bf16 model) and
    each result is rounded once to the tensor's dtype; the error against the float64 mean is then
    at most about ``world * eps * mean_r |x_r|`` of the accumulation dtype, plus half a unit in the
    last place of a low-precision tensor.

    Before any reduction, one small all-gather checks that every rank holds the same names, shapes,
    dtypes and device types in the same order, and passed the same ``weights`` and options; if not,
    every rank raises ``ValueError`` naming the first difference, and nothing is modified.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{WHAT} needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group, or torchrun)")
    if not (isinstance(bucket_mb, (int, float)) and math.isfinite(bucket_mb) and bucket_mb > 0):
        raise ValueError(f"{WHAT}: bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
    if accumulate_dtype is not None and not (accumulate_dtype.is_floating_point or accumulate_dtype.is_complex):
        raise ValueError(f"{WHAT}: accumulate_dtype must be a floating dtype, got {accumulate_dtype}")
    world = dist.get_world_size(group)
    shares = normalized_weights(weights, world)
    averaged, broadcast = replica_members(model, buffers)
    bucket_bytes = max(1, int(bucket_mb * 2**20))
    lines = request_lines(averaged, broadcast, world, shares, buffers, bucket_bytes, accumulate_dtype)
    check_same_replicas(lines, group, WHAT)

    share = None if shares is None else shares[dist.get_rank(group)]
    pending: Deque[_Reduction] = deque()
    for bucket in make_buckets([t for _, _, t in averaged], bucket_bytes, accumulate_dtype):
        pending.append(_Reduction(bucket, group, share, world))
        while len(pending) > IN_FLIGHT:
            pending.popleft().finish()
    while pending:
        pending.popleft().finish()
    if broadcast:
        take_from_first_rank([t for _, _, t in broadcast], group)


def take_from_first_rank(tensors: Sequence[Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """The group's first rank's values of ``tensors`` (integer/bool: nothing to average) on every
    rank: one broadcast per (device, dtype), packed like the averaged buckets."""
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for bucket in make_buckets(tensors, 2**62, None):  # one bucket per (device, dtype)
        flat = torch.cat([t.reshape(-1) for t in bucket.tensors])
        dist.broadcast(flat, src=source, group=group)
        pieces = flat.split([t.numel() for t in bucket.tensors])
        torch._foreach_copy_(bucket.tensors, [piece.view(t.shape) for piece, t in zip(pieces, bucket.tensors)])
