"""Before any replica is averaged: do all ranks hold the same model, and the same request?

A collective over tensors that differ between ranks (a missing parameter, another shape or dtype)
either hangs (different bucket counts) or averages unrelated numbers. :func:`check_same_replicas`
costs one all-gather of an 8-byte fingerprint per rank; only when the fingerprints differ does it
gather the descriptions themselves (``all_gather_object``) to name the first difference, and it
raises the same error on every rank, before anything is written.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def describe(name: str, kind: str, tensor: torch.Tensor) -> str:
    """One line of a replica's description: what must agree across ranks for ``name``."""
    return f"{kind} {name!r}: shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device type {tensor.device.type}"


def fingerprint(lines: Sequence[str]) -> int:
    """A signed 64-bit hash of the description (an int64 tensor carries it)."""
    digest = hashlib.sha256("\n".join(lines).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def communication_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where a small tensor for a collective of ``group`` must live: the current GPU for nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_difference(mine: Sequence[str], theirs: Sequence[str]) -> Optional[str]:
    """How ``theirs`` differs from ``mine``, in words (``None``: they are equal)."""
    for index, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"entry {index}: {b} where rank 0 has {a}"
    if len(mine) != len(theirs):
        longer, count = ("rank 0", len(mine)) if len(mine) > len(theirs) else ("it", len(theirs))
        extra = (mine if len(mine) > len(theirs) else theirs)[min(len(mine), len(theirs))]
        return f"{len(theirs)} entries against rank 0's {len(mine)}; {longer} also has {extra} ({count} in all)"
    return None


def check_same_replicas(lines: List[str], group: Optional[dist.ProcessGroup], what: str) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless every rank passed the same ``lines``.

    ``lines`` describe the tensors in order and the request (weights, options); ``what`` names the
    caller in the message. A collective: every rank of the group must call it.
    """
    world = dist.get_world_size(group)
    device = communication_device(group)
    local = torch.tensor([fingerprint(lines)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: List[Optional[List[str]]] = [None] * world
    dist.all_gather_object(everyone, lines, group=group)
    reference = everyone[0] or []
    for rank, theirs in enumerate(everyone[1:], start=1):
        difference = first_difference(reference, theirs or [])
        if difference is not None:
            global_rank = dist.get_global_rank(group, rank) if group is not None else rank
            raise ValueError(
                f"{what}: the ranks do not hold the same model (or request); rank {global_rank} differs from "
                f"rank 0 at {difference}. Nothing was modified."
            )
