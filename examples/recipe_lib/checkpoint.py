"""Recipe checkpoints: written atomically, so a crash mid-write never leaves a truncated file.

The write itself is ``swa_fast.checkpoint_average.save_atomic`` (temporary
file in the same directory, fsync, ``os.replace``): readers see the old
checkpoint or the new one, never half of one.

Under ``--fsdp`` the model's parameters and the optimizer's state are
DTensors, one shard per rank. A checkpoint stays one ``torch.save`` file of
full tensors all the same: :func:`model_state` and :func:`optimizer_state`
gather them into rank 0's host memory
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True,
cpu_offload=True``), and :func:`load_model_state` / :func:`load_optimizer_state`
hand every rank its shard of them again. Gathering and slicing only copy
values, so a run resumed from such a file continues bitwise as the
uninterrupted run, exactly as without ``--fsdp``; and the file's model state
dict is the unsharded model's (the same names, full tensors: ``torch.load`` it
into the plain model). Only the optimizer's state differs in form: keyed by
parameter name (torch.distributed.checkpoint's full optimizer state dict)
instead of by index.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from swa_fast.checkpoint_average import save_atomic as _save_atomic

from recipe_lib.distributed import DistContext, unwrap

# Gather full tensors to rank 0's host memory (the other ranks get empty dicts): the one copy that is written.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank reads the whole file and keeps its shard of each full tensor.
_SCATTER = StateDictOptions(full_state_dict=True)


def save_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj)`` to ``path`` (parent directories created) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(obj, path)
    return path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a recipe checkpoint onto the CPU (``load_state_dict`` moves tensors where they belong)."""
    # weights_only=False: the checkpoint holds metric rows next to the tensors; it is this program's own file.
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def model_state(model: nn.Module, ctx: DistContext) -> dict[str, Any]:
    """The model's state dict of full tensors; under ``--fsdp`` gathered on rank 0 (a collective: every
    rank calls it; the others get ``{}``)."""
    if ctx.fsdp:
        return get_model_state_dict(model, options=_GATHER)
    return unwrap(model).state_dict()


def load_model_state(model: nn.Module, state: dict[str, Any], ctx: DistContext) -> None:
    """Load what :func:`model_state` returned (under ``--fsdp`` every rank passes the full dict and keeps
    its shards; the parameters are written in place, so objects holding them stay valid)."""
    if ctx.fsdp:
        set_model_state_dict(model, state, options=_SCATTER)
    else:
        unwrap(model).load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """The optimizer's state dict; under ``--fsdp`` full tensors keyed by parameter name, gathered on
    rank 0 (a collective, as :func:`model_state`)."""
    if ctx.fsdp:
        return get_optimizer_state_dict(model, optimizer, options=_GATHER)
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         ctx: DistContext) -> None:
    """Load what :func:`optimizer_state` returned (param groups included: lr and any scheduler keys)."""
    if ctx.fsdp:
        set_optimizer_state_dict(model, optimizer, state, options=_SCATTER)
    else:
        optimizer.load_state_dict(state)


def full_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor whole, on the host: DTensors all-gathered (a collective: every rank calls it, and
    every rank gets the full tensors), others copied. One tensor is gathered at a time, so the
    device holds at most one full tensor beyond the shards."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
            for name, t in tensors.items()}


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named full tensors: names, dtypes, shapes and bytes, in order. Equal digests: bitwise
    equal tensors (so two runs, or a run and its checkpoint, can be compared by one string)."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
