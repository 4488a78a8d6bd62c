"""torch.distributed plumbing for the recipes: one process, or one rank of ``torchrun``.

Under ``torchrun --nproc_per_node=K`` every rank trains a DDP replica on its
shard of each epoch (``BatchLoader(rank=, world_size=)`` shards exactly like
``DistributedSampler``), evaluates its own slice of the test set, and the
metrics are summed across ranks; only rank 0 prints and writes files. Backend:
nccl for CUDA devices, gloo for CPU.

With ``--fsdp`` the model is sharded with FSDP2 (``fully_shard``) instead of
replicated by DDP: each rank then holds one shard of every parameter and of
its optimizer state, and every forward all-gathers the parameters (a
collective: every rank must run as many forwards as the others). Without
``torchrun`` (``WORLD_SIZE`` unset or 1) ``--fsdp`` runs on a one-rank process
group of its own (an in-process ``HashStore``: no port, no launcher), so the
sharded code path can be run and debugged in a single process.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (a process group is initialized)."""
        return self.world_size > 1

    @property
    def has_group(self) -> bool:
        """A process group is initialized: more than one process, or ``--fsdp`` (FSDP2 needs one, even of one rank)."""
        return self.enabled or self.fsdp


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


def init_distributed(device_name: str, fsdp: bool = False) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else a single process.

    ``fsdp`` and a single process: a one-rank group of this process alone (FSDP2's device mesh
    needs a process group whatever its size).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1 and not fsdp:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=10)
        if world_size <= 1:
            # No torchrun: no MASTER_ADDR/PORT to rendezvous at, and nothing to meet. An in-process store.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), device, fsdp)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process without ``--fsdp``).

    The caller must hold no model, optimizer or average any more: FSDP2's modules sit in
    reference cycles (their hooks refer back to them), which only the garbage collector frees.
    Left to interpreter shutdown, freeing their tensors after the group is gone aborted the
    process now and then ("terminate called without an active exception", after the last line
    of the run, on CPU/gloo); collected here, while the group and the interpreter are still
    whole, it never did.
    """
    if ctx.has_group and dist.is_initialized():
        gc.collect()
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


def shard_fsdp2(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` sharded with FSDP2 over all ranks: each top-level child that has parameters, then the root.

    Sharding the children separately lets FSDP2 gather one block at a time in the forward
    (and free it after); the root's ``fully_shard`` takes the parameters no child holds
    (none, for the recipes' models). ``model`` is sharded in place and returned.
    """
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model as it trains: sharded with FSDP2 under ``--fsdp``, else DDP under ``torchrun``, else itself."""
    return shard_fsdp2(model, ctx) if ctx.fsdp else wrap_ddp(model, ctx)


def share_rank0_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BN running statistics) on every rank of an FSDP2 model; a no-op otherwise.

    FSDP2 shards parameters only: each rank's BN statistics follow its own batches, so the ranks
    would evaluate their test slices with different statistics and a checkpoint (rank 0's) would
    not hold the other ranks' state, breaking a bitwise resume. DDP broadcasts rank 0's buffers
    before every forward; this, called after each epoch's training, leaves every rank with the
    statistics DDP's rank 0 would have (training itself uses batch statistics, not these).
    """
    if not (ctx.fsdp and ctx.enabled):
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for evaluation without DDP's collective buffer broadcast).

    An FSDP2 model is its own module (``fully_shard`` changes the model's class, not its nesting).
    """
    return model.module if isinstance(model, DistributedDataParallel) else model
