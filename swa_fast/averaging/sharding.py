"""FSDP2 parameters as the averaging sees them: DTensors whose local shards it averages.

``fully_shard`` replaces every parameter by a DTensor that holds one shard per
rank. An average of it needs only that shard: the fused update reads the
parameter's local tensor (no communication), the average is a plain tensor of
the local shard's shape, and :func:`dtensor_like` wraps it back into a DTensor
with the parameter's mesh and placements for ``state_dict`` (which is what
``torch.distributed.checkpoint`` saves, loads and reshards).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import Module

try:  # torch builds without distributed support have no DTensor; nothing is sharded there
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - every build these tests run on has torch.distributed
    DTensor = FSDPModule = None  # type: ignore[assignment, misc]


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def reshard(model: Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state.

    After a forward without a backward (evaluation), FSDP2 leaves the root module's parameters
    all-gathered (its ``reshard_after_forward`` is off) and registered in place of the DTensors.
    The averages pair with the shards, and a write into a shard while a gathered copy exists
    would not be seen by the next forward, which reuses the copy: so every read or write of the
    shards starts here (a no-op for modules already sharded and for models without FSDP2).
    """
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def meshes_of(tensors) -> Tuple[Any, ...]:
    """The distinct device meshes of the DTensors among ``tensors``."""
    found: dict = {}
    for tensor in tensors:
        if is_dtensor(tensor):
            found.setdefault(id(tensor.device_mesh), tensor.device_mesh)
    return tuple(found.values())


def any_across(flag: Tensor, meshes: Tuple[Any, ...]) -> Tensor:
    """``flag`` OR-ed over every rank of ``meshes``: a rank whose shard holds a NaN must make every
    rank skip the update, or the shards of one average would mix two histories. One all-reduce of
    one value per mesh dimension, asynchronous on the device (no host sync); nothing without meshes."""
    if not meshes:
        return flag
    value = flag.to(torch.int32)  # MAX over 0/1 is OR; every backend reduces int32
    for mesh in meshes:
        for group in mesh.get_all_groups():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
    return value.bool()


def local_tensor(tensor: Tensor) -> Tensor:
    """The tensor the kernels read and write: a DTensor's local shard (the very tensor object
    FSDP2 keeps, so in-place writes reach the parameter), any other tensor itself."""
    if is_dtensor(tensor):
        # to_local() returns this object too, but through an autograd Function when grad mode is
        # on; the attribute is what it returns under no_grad, without the per-call overhead.
        return tensor._local_tensor
    return tensor


class ShardLayout(NamedTuple):
    """How a sharded parameter is laid out: what a DTensor of its average needs."""

    device_mesh: Any
    placements: Tuple[Any, ...]
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def layout_of(tensor: Tensor) -> Optional[ShardLayout]:
    """A DTensor's layout; None for any other tensor."""
    if not is_dtensor(tensor):
        return None
    return ShardLayout(tensor.device_mesh, tuple(tensor.placements), tuple(tensor.shape), tuple(tensor.stride()))


_HOST_MESHES: dict = {}  # id(device mesh) -> (the mesh, its CPU twin)


def _has_cpu_backend(group: Any) -> bool:
    try:
        group._get_backend(torch.device("cpu"))
        return True
    except RuntimeError:
        return False


def host_mesh_like(mesh: Any) -> Any:
    """A CPU device mesh over the same ranks and dimensions as ``mesh``: the mesh of averages kept
    in host memory for a model sharded on GPUs, so that their DTensors' collectives
    (``full_tensor()``, ``redistribute``, a checkpoint's resharding) run on a CPU backend instead
    of handing host tensors to NCCL. Built once per mesh, from the mesh's own groups when they have
    a CPU backend (``init_process_group()`` without a backend gives every group gloo beside nccl),
    else with new gloo groups, which is a collective: every rank makes the same averages, in the
    same order, as it makes the model."""
    if mesh.device_type == "cpu":
        return mesh
    cached = _HOST_MESHES.get(id(mesh))
    if cached is not None and cached[0] is mesh:
        return cached[1]
    from torch.distributed.device_mesh import DeviceMesh

    groups = [mesh.get_group(dim) for dim in range(mesh.ndim)]
    if all(map(_has_cpu_backend, groups)):
        host = DeviceMesh.from_group(groups[0] if mesh.ndim == 1 else groups, "cpu", mesh=mesh.mesh,
                                     mesh_dim_names=mesh.mesh_dim_names)
    else:
        host = DeviceMesh("cpu", mesh.mesh, mesh_dim_names=mesh.mesh_dim_names,
                          backend_override=(("gloo", None),) * mesh.ndim)
    _HOST_MESHES[id(mesh)] = (mesh, host)
    return host


def mesh_for(local: Tensor, like: ShardLayout) -> Any:
    """The mesh of a DTensor holding ``local``: the parameter's, or its CPU twin for host averages."""
    return like.device_mesh if local.device.type == like.device_mesh.device_type else host_mesh_like(like.device_mesh)


def dtensor_like(local: Tensor, like: ShardLayout) -> "DTensor":
    """``local`` (the average of a parameter's local shard, possibly in another dtype or on the
    host) as a DTensor with the parameter's placements, global shape and stride, sharing
    ``local``'s storage, so that loading into it (``torch.distributed.checkpoint.load``)
    writes the average itself. Its mesh is the parameter's, or for an average kept in host memory
    under a GPU mesh the CPU twin of that mesh (:func:`host_mesh_like`), whose collectives take
    host tensors."""
    return DTensor.from_local(local, mesh_for(local, like), like.placements, run_check=False,
                              shape=torch.Size(like.shape), stride=like.stride)


def local_part(value: Tensor, like: Optional[ShardLayout]) -> Tensor:
    """The part of a state-dict value that belongs to this rank's average of ``like``.

    ``like`` None (an unsharded parameter): a DTensor value is gathered whole (a collective:
    every rank loads), a plain tensor is taken as it is. A sharded parameter: a DTensor with the
    same mesh and placements gives its local tensor; any other DTensor is gathered first; a plain
    full tensor is sliced to this rank's shard locally (no communication).
    """
    value = value.detach()  # distribute_tensor takes leaves only (a full_tensor() of a parameter is not one)
    if like is None:
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        same_mesh = value.device_mesh == like.device_mesh or (
            like.device_mesh.device_type != "cpu" and value.device_mesh == host_mesh_like(like.device_mesh))
        if same_mesh and tuple(value.placements) == like.placements:
            return value._local_tensor
        value = value.full_tensor()
    if tuple(value.shape) != tuple(like.shape):
        return value  # the caller reports the shape mismatch with the key's name
    # src_data_rank=None: every rank cuts its own shard from its copy, no scatter.
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)._local_tensor


class ShardGroup(NamedTuple):
    """One mesh dimension that shards some tensors of a list, and which of them (a bool mask)."""

    group: Any
    sharded: Tensor


def shard_groups(layouts: Sequence[Optional[ShardLayout]], device: torch.device) -> Tuple[ShardGroup, ...]:
    """The mesh dimensions along which tensors of a list (``layouts[i]`` of tensor ``i``, None for a
    plain tensor) are ``Shard``-ed, each with the mask of those tensors on ``device``: what
    :func:`sum_over_shards` reduces over. Built once per list: the masks are host-made tensors.

    Raises:
        ValueError: a ``Partial`` placement (unreduced values, whose norm is not defined by the
            local parts): ``redistribute`` the tensor first.
    """
    found: dict = {}
    for index, layout in enumerate(layouts):
        if layout is None:
            continue
        for dim, placement in enumerate(layout.placements):
            if placement.is_partial():
                raise ValueError(f"tensor {index} has a Partial placement ({placement}) on mesh dimension {dim}: "
                                 "its local values are unreduced; redistribute it to Shard or Replicate first")
            if placement.is_shard():
                key = (id(layout.device_mesh), dim)
                found.setdefault(key, (layout.device_mesh.get_group(dim), [False] * len(layouts)))[1][index] = True
    return tuple(ShardGroup(group, torch.tensor(mask, device=device)) for group, mask in found.values())


def sum_over_shards(values: Tensor, groups: Sequence[ShardGroup]) -> Tensor:
    """``values[i]`` (a per-tensor quantity that adds up over shards, e.g. the squared norm of a
    local shard) summed over the ranks that hold the other shards of tensor ``i``.

    A mesh dimension along which tensor ``i`` is ``Shard``-ed contributes every rank's part; one
    along which it is ``Replicate``-d holds copies, which must be counted once (HSDP's replicas).
    So each group (:func:`shard_groups`) gets one all-reduce of the whole vector with the entries
    it does not shard zeroed, and its sums replace only the entries it shards. Asynchronous on the
    device, no host sync; every rank must call it with the same groups, as with any collective.
    """
    for group, sharded in groups:
        parts = torch.where(sharded, values, torch.zeros_like(values))
        torch.distributed.all_reduce(parts, group=group)
        values = torch.where(sharded, parts, values)
    return values
