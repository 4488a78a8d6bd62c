"""torch.distributed plumbing for the recipes: one process, or one rank of ``torchrun``.

Under ``torchrun --nproc_per_node=K`` every rank trains a DDP replica on its
shard of each epoch (``BatchLoader(rank=, world_size=)`` shards exactly like
``DistributedSampler``), evaluates its own slice of the test set, and the
metrics are summed across ranks; only rank 0 prints and writes files. Backend:
nccl for CUDA devices, gloo for CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (a process group is initialized)."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.enabled:
        dist.barrier()


def sum_across_ranks(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum over ranks, in float64 (sample counts and summed losses stay exact)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    # gloo reduces CPU tensors; nccl needs them on the rank's GPU.
    where = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group, the model itself otherwise."""
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for evaluation without DDP's collective buffer broadcast)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
